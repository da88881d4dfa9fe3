/**
 * GET /healthz: 200 `ok` when the pool and store are ready; 503 REGISTRY_UNAVAILABLE for a cluster
 * replica without a live etcd lease, NOT_READY otherwise (no auth).
 */
import { kmsError } from '../../errors.js';
import type { RouteSpec } from '../route.js';

export const healthzRoute: RouteSpec = {
  method: 'GET',
  path: '/healthz',
  op: 'healthz',
  help: '→ 200 "ok" when ready, 503 otherwise; no authentication',
  public: true,
  doc: () => ({ answer: { text: 'text/plain' } }),
  handle: async ({ services }) => {
    if (!services.accepting()) throw kmsError('NOT_READY', 'shutting down');
    const health = await services.kms.health().catch(() => null);
    if (health?.replica?.serving === false) {
      throw kmsError('REGISTRY_UNAVAILABLE', `not serving: ${health.replica.reason ?? 'no etcd lease'}`);
    }
    if (!health?.ok) throw kmsError('NOT_READY');
    return { status: 200, contentType: 'text/plain; charset=utf-8', text: 'ok' };
  },
};
