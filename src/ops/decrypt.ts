/** decrypt: with the DEK version named in the ciphertext; batchable. */
import { encodeBase64 } from '../wire/base64.js';
import { base64, single } from './fields.js';
import { batchOp } from './op.js';
import { ciphertextItemBinary, ciphertextItemRecord } from './shapes.js';

const plaintextRecord = single(base64('plaintext'));

export const plaintextToWire = plaintextRecord.toWire;

/** The text JSON.stringify(plaintextToWire(p)) gives, without the object: the hot answer of /decrypt. */
export function plaintextJson(p: Uint8Array): string {
  return `{"plaintext":"${encodeBase64(p)}"}`;
}

export const decrypt = batchOp({
  name: 'decrypt',
  code: 0x04,
  idempotent: true,
  http: {
    method: 'POST',
    path: '/decrypt',
    help: '{"key_id","ciphertext","aad"?} or {"batch_input":[...]} → {"plaintext"}',
  },
  json: { item: ciphertextItemRecord, result: { ...plaintextRecord, toJson: plaintextJson } },
  binary: {
    item: ciphertextItemBinary,
    result: {
      write: (w, v) => void w.bytes(v),
      read: (r) => r.bytes(),
      sizeHint: (v) => 12 + v.length,
    },
  },
  run: (kms, { items }, ctx) => kms.decryptBatch(items, ctx),
});
