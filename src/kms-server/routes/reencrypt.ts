/** POST /reencrypt: decrypts and encrypts again under the key's current version, inside the worker. */
import { encryptResultToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

const parse = compileSchema(
  {
    key_id: { kind: 'id' },
    ciphertext: { kind: 'base64' },
    aad: { kind: 'base64', optional: true },
  },
  { strict: true },
);

export const reencryptRoute: RouteSpec = {
  ...HTTP_ROUTES.reencrypt,
  op: 'reencrypt',
  help: '{"key_id","ciphertext","aad"?} → {"ciphertext","key_version"}',
  jsonBody: true,
  handle: async ({ body, services, caller }) => {
    const f = parse(body);
    return jsonReply(
      encryptResultToWire(await services.kms.reencrypt(f.key_id, f.ciphertext, f.aad, caller)),
    );
  },
};
