/** GET /health: the KMS health snapshot (authenticated; /healthz is the bare probe). */
import { HTTP_ROUTES, healthToWire } from '../../wire/http-json.js';
import { jsonReply, type RouteSpec } from '../route.js';

export const healthRoute: RouteSpec = {
  ...HTTP_ROUTES.health,
  op: 'health',
  help: '→ {"ok","kek_id","active_kek_version","dek_count","pool_threads","queue_depth","rotation":{...}}',
  handle: async ({ services }) => jsonReply(healthToWire(await services.kms.health())),
};
