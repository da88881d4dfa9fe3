/** rotate_kek (POST): starts (or resumes, or joins) a KEK rotation in the background → its status. */
import { singleOp } from './op.js';
import { noParamsBinary, noParamsRecord, rotationStatusBinary, rotationStatusRecord } from './shapes.js';

export const rotateKek = singleOp({
  name: 'rotate_kek',
  code: 0x0a,
  idempotent: false,
  http: {
    method: 'POST',
    path: '/rotate_kek',
    help: '(no body) → {"state","kek_id","active_kek_version","target_kek_version","done","total",...}',
  },
  json: { request: noParamsRecord, result: rotationStatusRecord },
  binary: { request: noParamsBinary('rotate_kek'), result: rotationStatusBinary },
  run: (kms, _p, ctx) => kms.startKekRotation(ctx),
});
