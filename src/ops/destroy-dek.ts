/** destroy_dek: destroys the DEK and all its versions (crypto-shredding). */
import { singleOp } from './op.js';
import { destroyResultBinary, destroyResultRecord, keyParamsBinary, keyParamsRecord } from './shapes.js';

export const destroyDek = singleOp({
  name: 'destroy_dek',
  code: 0x09,
  idempotent: false,
  http: {
    method: 'POST',
    path: '/destroy_dek',
    help: '{"key_id"} → {"key_id","destroyed_versions":"1,2"}',
    strict: true,
  },
  json: { request: keyParamsRecord, result: destroyResultRecord },
  binary: { request: keyParamsBinary('destroy_dek'), result: destroyResultBinary },
  run: (kms, p, ctx) => kms.destroyDek(p.keyId, ctx),
});
