/** Every HTTP endpoint of the daemon, in the order the docs list them: probes and the OpenAPI document, then the KMS ops. */
import { OPS } from '../../ops/index.js';
import { opRoute, type RouteSpec } from '../route.js';
import { healthzRoute } from './healthz.js';
import { metricsRoute } from './metrics.js';
import { openApiRoute } from './openapi.js';

export const ROUTES: readonly RouteSpec[] = [
  healthzRoute,
  metricsRoute,
  openApiRoute(() => ROUTES),
  ...OPS.filter((op) => op.http.sharedRoute !== true).map(opRoute),
];
