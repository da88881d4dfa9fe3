/** POST /destroy_dek: destroys the DEK and all its versions (crypto-shredding); idempotent. */
import { destroyResultToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

const parse = compileSchema({ key_id: { kind: 'id' } }, { strict: true });

export const destroyDekRoute: RouteSpec = {
  ...HTTP_ROUTES.destroy_dek,
  op: 'destroy_dek',
  help: '{"key_id"} → {"key_id","destroyed_versions":"1,2"}',
  jsonBody: true,
  handle: async ({ body, services, caller }) =>
    jsonReply(destroyResultToWire(await services.kms.destroyDek(parse(body).key_id, caller))),
};
