/** Every HTTP endpoint of the daemon, in the order the docs list them. */
import type { RouteSpec } from '../route.js';
import { createDekForThreadRoute } from './create-dek-for-thread.js';
import { decryptRoute } from './decrypt.js';
import { destroyDekRoute } from './destroy-dek.js';
import { destroyDekVersionsBeforeRoute } from './destroy-dek-versions-before.js';
import { encryptRoute } from './encrypt.js';
import { getWrappedRoute } from './get-wrapped.js';
import { healthRoute } from './health.js';
import { healthzRoute } from './healthz.js';
import { metricsRoute } from './metrics.js';
import { reencryptRoute } from './reencrypt.js';
import { rewrapRoute } from './rewrap.js';
import { rotateDekRoute } from './rotate-dek.js';
import { rotateKekRoute } from './rotate-kek.js';
import { rotationStatusRoute } from './rotation-status.js';

export const ROUTES: readonly RouteSpec[] = [
  healthzRoute,
  metricsRoute,
  healthRoute,
  createDekForThreadRoute,
  getWrappedRoute,
  encryptRoute,
  decryptRoute,
  reencryptRoute,
  rewrapRoute,
  rotateDekRoute,
  destroyDekRoute,
  destroyDekVersionsBeforeRoute,
  rotateKekRoute,
  rotationStatusRoute,
];
