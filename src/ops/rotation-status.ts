/** rotation_status (GET /rotate_kek): status and progress of the current or last KEK rotation. */
import { singleOp } from './op.js';
import { noParamsBinary, noParamsRecord, rotationStatusBinary, rotationStatusRecord } from './shapes.js';

export const rotationStatus = singleOp({
  name: 'rotation_status',
  code: 0x0b,
  idempotent: true,
  http: {
    method: 'GET',
    path: '/rotate_kek',
    help: '→ {"state":"idle|running|completed","done","total","target_kek_version",...}',
  },
  json: { request: noParamsRecord, result: rotationStatusRecord },
  binary: { request: noParamsBinary('rotation_status'), result: rotationStatusBinary },
  run: (kms) => kms.rotationStatus(),
});
