/** POST /rewrap: rewraps every stored version of one DEK under the active KEK. */
import { dekInfoToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

const parse = compileSchema({ key_id: { kind: 'id' } });

export const rewrapRoute: RouteSpec = {
  ...HTTP_ROUTES.rewrap,
  op: 'rewrap',
  help: '{"key_id"} → {"key_id","wrapped","kek_id","kek_version",...} wrapped under the active KEK',
  jsonBody: true,
  handle: async ({ body, services, caller }) =>
    jsonReply(dekInfoToWire(await services.kms.rewrapDek(parse(body).key_id, caller))),
};
