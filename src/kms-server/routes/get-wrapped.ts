/** GET /get_wrapped?key_id=K: the key's current version, wrapped under its KEK. */
import { dekInfoToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

const parse = compileSchema({ key_id: { kind: 'id' } });

export const getWrappedRoute: RouteSpec = {
  ...HTTP_ROUTES.get_wrapped,
  op: 'get_wrapped',
  help: '?key_id=K → {"wrapped","key_id","kek_id","kek_version","key_version","thread_id","created_at"}',
  handle: async ({ query, services, caller }) =>
    jsonReply(dekInfoToWire(await services.kms.getWrappedDek(parse(query).key_id, caller))),
};
