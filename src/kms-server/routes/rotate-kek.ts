/** POST /rotate_kek: starts (or resumes, or joins) a KEK rotation in the background → its status. */
import { HTTP_ROUTES, rotationStatusToWire } from '../../wire/http-json.js';
import { jsonReply, type RouteSpec } from '../route.js';

export const rotateKekRoute: RouteSpec = {
  ...HTTP_ROUTES.rotate_kek,
  op: 'rotate_kek',
  help: '(no body) → {"state","kek_id","active_kek_version","target_kek_version","done","total",...}',
  handle: async ({ services, caller }) =>
    jsonReply(rotationStatusToWire(await services.kms.startKekRotation(caller))),
};
