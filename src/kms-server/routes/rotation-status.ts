/** GET /rotate_kek: status and progress of the current or last KEK rotation. */
import { HTTP_ROUTES, rotationStatusToWire } from '../../wire/http-json.js';
import { jsonReply, type RouteSpec } from '../route.js';

export const rotationStatusRoute: RouteSpec = {
  ...HTTP_ROUTES.rotation_status,
  op: 'rotation_status',
  help: '→ {"state":"idle|running|completed","done","total","target_kek_version",...}',
  handle: async ({ services }) => jsonReply(rotationStatusToWire(await services.kms.rotationStatus())),
};
