/** GET /metrics: Prometheus text format (no auth; holds counts and timings, never key data). */
import type { RouteSpec } from '../route.js';

export const metricsRoute: RouteSpec = {
  method: 'GET',
  path: '/metrics',
  op: 'metrics',
  help: '→ Prometheus metrics: requests, errors, latency, pool queue depth, rotation progress',
  public: true,
  doc: () => ({ answer: { text: 'text/plain' } }),
  handle: async ({ services }) => {
    services.metrics.setHealth(await services.kms.health().catch(() => null));
    return { status: 200, contentType: services.metrics.contentType, text: await services.metrics.render() };
  },
};
