/** GET /metrics: Prometheus text format, behind the admin key. */
import { serverRoute } from './route.js';

export const metricsRoute = serverRoute({
  method: 'GET',
  path: '/metrics',
  scope: 'admin',
  help: '→ Prometheus metrics: requests, errors, latency, KMS reachability',
  reply: { text: 'text/plain' },
  handle: async (ctx, { metrics }) => {
    ctx.type = metrics.registry.contentType;
    ctx.body = await metrics.registry.metrics();
  },
});
