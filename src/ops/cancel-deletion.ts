/** cancel_deletion: restores a key pending deletion (destroy_dek within its deletion window). */
import { singleOp } from './op.js';
import { dekInfoBinary, dekInfoRecord, keyParamsBinary, keyParamsRecord } from './shapes.js';

export const cancelDeletion = singleOp({
  name: 'cancel_deletion',
  code: 0x0e,
  // A repeat after it took effect is refused (KEY_NOT_PENDING_DELETION): not retried blindly.
  idempotent: false,
  http: {
    method: 'POST',
    path: '/cancel_deletion',
    help: '{"key_id"} → {"key_id","key_version",...}: the key pending deletion is usable again',
    strict: true,
  },
  json: { request: keyParamsRecord, result: dekInfoRecord },
  binary: { request: keyParamsBinary('cancel_deletion'), result: dekInfoBinary },
  run: (kms, p, ctx) => kms.cancelDeletion(p.keyId, ctx),
});
