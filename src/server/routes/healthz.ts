/** GET /healthz: no key; 200 when ready, 503 when the KMS cannot be reached. */
import { serverRoute } from './route.js';
import { ready as readyView } from './views.js';

export const healthz = serverRoute({
  method: 'GET',
  path: '/healthz',
  scope: 'public',
  help: '→ 200 {"status":"ok"} when ready, 503 KMS_UNAVAILABLE otherwise; no key',
  reply: { schema: readyView },
  handle: async (ctx, { kms, metrics }) => {
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
  },
});
