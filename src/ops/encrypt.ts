/** encrypt: under the key's current DEK version; batchable. */
import type { EncryptItem } from '../api/index.js';
import { base64, record } from './fields.js';
import { batchOp } from './op.js';
import {
  AAD,
  DATA_ITEM_MIN_BYTES,
  dataItemSizeHint,
  encryptResultBinary,
  encryptResultJson,
  encryptResultRecord,
  KEY_ID,
} from './shapes.js';

export const encrypt = batchOp({
  name: 'encrypt',
  code: 0x03,
  idempotent: false,
  repeatable: true,
  http: {
    method: 'POST',
    path: '/encrypt',
    help: '{"key_id","plaintext","aad"?} or {"batch_input":[...]} → {"ciphertext","key_version"}',
  },
  json: {
    item: record<EncryptItem>({ keyId: KEY_ID, plaintext: base64('plaintext'), aad: AAD }),
    result: { ...encryptResultRecord, toJson: encryptResultJson },
  },
  binary: {
    item: {
      write: (w, it) => void w.str(it.keyId).bytes(it.plaintext).optBytes(it.aad),
      read: (r) => ({ keyId: r.str(), plaintext: r.bytes(), aad: r.optBytes() }),
      sizeHint: (it) => dataItemSizeHint(it.keyId, it.plaintext, it.aad),
      minBytes: DATA_ITEM_MIN_BYTES,
    },
    result: encryptResultBinary,
  },
  run: (kms, { items }, ctx) => kms.encryptBatch(items, ctx),
});
