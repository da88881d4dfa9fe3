/** POST /admin/encryption/rotate-kek: starts (or joins) a KEK rotation; `?wait=true` waits for it. */
import { rotationStatusView } from '../../ops/shapes.js';
import { callContext } from '../context.js';
import { wantsWait } from './admin-jobs.js';
import { serverRoute } from './route.js';

export const adminRotateKek = serverRoute({
  method: 'POST',
  path: '/admin/encryption/rotate-kek',
  scope: 'admin',
  help: '?wait → 202 (200 when waited for) the KEK rotation status',
  reply: { statuses: [200, 202] },
  handle: async (ctx, { service }) => {
    const kms = service.requireKms();
    if (wantsWait(ctx)) {
      ctx.body = rotationStatusView(await kms.rotateKek(callContext(ctx)));
    } else {
      ctx.status = 202;
      ctx.body = rotationStatusView(await kms.startKekRotation(callContext(ctx)));
    }
  },
});
