/**
 * reencrypt_batch: reencrypt for many ciphertexts, each answered on its own (DEK rotation jobs
 * send a page of messages at once). HTTP: POST /reencrypt with `batch_input`; the route answers
 * reencrypt's single body as well, so both count as `reencrypt` in the metrics.
 */
import { batchOp } from './op.js';
import {
  ciphertextItemBinary,
  ciphertextItemRecord,
  encryptResultBinary,
  encryptResultJson,
  encryptResultRecord,
} from './shapes.js';

export const reencryptBatch = batchOp({
  name: 'reencrypt_batch',
  label: 'reencrypt',
  code: 0x0d,
  idempotent: false,
  repeatable: true,
  http: {
    method: 'POST',
    path: '/reencrypt',
    help: '{"key_id","ciphertext","aad"?} or {"batch_input":[...]} → {"ciphertext","key_version"}',
    strict: true,
  },
  json: { item: ciphertextItemRecord, result: { ...encryptResultRecord, toJson: encryptResultJson } },
  binary: {
    item: ciphertextItemBinary,
    result: encryptResultBinary,
  },
  run: (kms, { items }, ctx) => kms.reencryptBatch(items, ctx),
});
