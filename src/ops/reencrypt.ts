/**
 * reencrypt: decrypts with the DEK version named in the ciphertext and encrypts again under the
 * key's current version, inside one worker call (the plaintext never leaves the worker).
 */
import { singleOp } from './op.js';
import { reencryptBatch } from './reencrypt-batch.js';
import {
  ciphertextItemBinary,
  ciphertextItemRecord,
  encryptResultBinary,
  encryptResultRecord,
} from './shapes.js';

export const reencrypt = singleOp({
  name: 'reencrypt',
  code: 0x05,
  idempotent: false,
  repeatable: true,
  // The client sends its single body to POST /reencrypt, which reencrypt_batch's route serves.
  http: { ...reencryptBatch.http, sharedRoute: true },
  json: { request: ciphertextItemRecord, result: encryptResultRecord },
  binary: {
    request: { ...ciphertextItemBinary, read: (r) => ({ op: 'reencrypt', ...ciphertextItemBinary.read(r) }) },
    result: encryptResultBinary,
  },
  run: (kms, p, ctx) => kms.reencrypt(p.keyId, p.ciphertext, p.aad, ctx),
});
