/** get_wrapped (GET ?key_id=K): the key's current version, wrapped under its KEK. */
import { singleOp } from './op.js';
import { dekInfoBinary, dekInfoRecord, keyParamsBinary, keyParamsRecord } from './shapes.js';

export const getWrapped = singleOp({
  name: 'get_wrapped',
  code: 0x02,
  idempotent: true,
  http: {
    method: 'GET',
    path: '/get_wrapped',
    help: '?key_id=K → {"wrapped","key_id","kek_id","kek_version","key_version","thread_id","created_at"}',
  },
  json: { request: keyParamsRecord, result: dekInfoRecord },
  binary: { request: keyParamsBinary('get_wrapped'), result: dekInfoBinary },
  run: (kms, p, ctx) => kms.getWrappedDek(p.keyId, ctx),
});
