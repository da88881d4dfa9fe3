/** rotate_dek: adds a new DEK version and makes it current; older versions still decrypt. */
import { singleOp } from './op.js';
import { dekInfoBinary, dekInfoRecord, keyParamsBinary, keyParamsRecord } from './shapes.js';

export const rotateDek = singleOp({
  name: 'rotate_dek',
  code: 0x07,
  idempotent: false,
  http: {
    method: 'POST',
    path: '/rotate_dek',
    help: '{"key_id"} → {"key_id","key_version",...} describing the new current version',
    strict: true,
  },
  json: { request: keyParamsRecord, result: dekInfoRecord },
  binary: { request: keyParamsBinary('rotate_dek'), result: dekInfoBinary },
  run: (kms, p, ctx) => kms.rotateDek(p.keyId, ctx),
});
