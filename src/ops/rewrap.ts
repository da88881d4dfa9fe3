/** rewrap: rewraps every stored version of one DEK under the active KEK. */
import { singleOp } from './op.js';
import { dekInfoBinary, dekInfoRecord, keyParamsBinary, keyParamsRecord } from './shapes.js';

export const rewrap = singleOp({
  name: 'rewrap',
  code: 0x06,
  idempotent: true,
  http: {
    method: 'POST',
    path: '/rewrap',
    help: '{"key_id"} → {"key_id","wrapped","kek_id","kek_version",...} wrapped under the active KEK',
    strict: true,
    // ProgressDB's Go server sends {"key_id","new_kek_hex"} here, expecting a rewrap under its own
    // KEK. This KMS generates its KEKs itself and never accepts or reveals one, so a caller's KEK
    // is refused (not silently ignored, which would look like a rotation to that key).
    unknownFieldHint:
      'the KEK never leaves the KMS and cannot be supplied; /rewrap rewraps under the active KEK, ' +
      'and POST /rotate_kek rotates to a new KEK the KMS generates',
  },
  json: { request: keyParamsRecord, result: dekInfoRecord },
  binary: { request: keyParamsBinary('rewrap'), result: dekInfoBinary },
  run: (kms, p, ctx) => kms.rewrapDek(p.keyId, ctx),
});
