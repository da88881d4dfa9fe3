/** GET /healthz (no key: 200 ready, 503 not) and GET /metrics (Prometheus, admin key). */
import type { RouteGroup } from '../context.js';

export const healthRoutes: RouteGroup = (router, { kms, keys, metrics }) => {
  router.get('/healthz', async (ctx) => {
    let ready = true;
    if (kms) {
      try {
        ready = (await kms.health()).ok;
      } catch {
        ready = false;
      }
      metrics.kmsUp.set(ready ? 1 : 0);
    }
    ctx.status = ready ? 200 : 503;
    ctx.body = ready
      ? { status: 'ok' }
      : { error: { code: 'KMS_UNAVAILABLE', message: 'the KMS cannot be reached; not ready' } };
  });

  router.get('/metrics', keys.require('admin'), async (ctx) => {
    ctx.type = metrics.registry.contentType;
    ctx.body = await metrics.registry.metrics();
  });
};
