/** GET /admin/encryption/rotate-kek: status of the current or last KEK rotation. */
import { rotationStatusView } from '../../ops/shapes.js';
import { serverRoute } from './route.js';

export const adminRotationStatus = serverRoute({
  method: 'GET',
  path: '/admin/encryption/rotate-kek',
  scope: 'admin',
  help: '→ {"state","kek_id","active_kek_version","done","total","kek_versions",...}',
  handle: async (ctx, { service }) => {
    ctx.body = rotationStatusView(await service.requireKms().rotationStatus());
  },
});
