/** POST /create_dek_for_thread: the thread's DEK, created on first call (idempotent). */
import { dekInfoToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

const parse = compileSchema({ thread_id: { kind: 'id' } }, { strict: true });

export const createDekForThreadRoute: RouteSpec = {
  ...HTTP_ROUTES.create_dek_for_thread,
  op: 'create_dek_for_thread',
  help: '{"thread_id"} → {"key_id","wrapped","kek_id","kek_version","key_version","thread_id","created_at"}',
  jsonBody: true,
  handle: async ({ body, services, caller }) =>
    jsonReply(dekInfoToWire(await services.kms.createDekForThread(parse(body).thread_id, caller))),
};
