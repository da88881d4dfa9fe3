/** GET /healthz: 200 `ok` when the pool and store are ready, 503 NOT_READY otherwise (no auth). */
import { kmsError } from '../../errors.js';
import type { RouteSpec } from '../route.js';

export const healthzRoute: RouteSpec = {
  method: 'GET',
  path: '/healthz',
  op: 'healthz',
  help: '→ 200 "ok" when ready, 503 otherwise; no authentication',
  public: true,
  handle: async ({ services }) => {
    if (!services.accepting()) throw kmsError('NOT_READY', 'shutting down');
    const health = await services.kms.health().catch(() => null);
    if (!health?.ok) throw kmsError('NOT_READY');
    return { status: 200, contentType: 'text/plain; charset=utf-8', text: 'ok' };
  },
};
