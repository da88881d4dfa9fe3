/** POST /rotate_dek: adds a new DEK version and makes it current. */
import { dekInfoToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

const parse = compileSchema({ key_id: { kind: 'id' } }, { strict: true });

export const rotateDekRoute: RouteSpec = {
  ...HTTP_ROUTES.rotate_dek,
  op: 'rotate_dek',
  help: '{"key_id"} → {"key_id","key_version",...} describing the new current version',
  jsonBody: true,
  handle: async ({ body, services, caller }) =>
    jsonReply(dekInfoToWire(await services.kms.rotateDek(parse(body).key_id, caller))),
};
