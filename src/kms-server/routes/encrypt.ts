/** POST /encrypt: encrypts under the key's current DEK version; batchable. */
import type { EncryptItem, EncryptResult } from '../../protocol.js';
import { encryptResultJson, encryptResultToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, type RouteSpec, runBatchRoute } from '../route.js';

const parseItem = compileSchema({
  key_id: { kind: 'id' },
  plaintext: { kind: 'base64' },
  aad: { kind: 'base64', optional: true },
});

export const encryptRoute: RouteSpec = {
  ...HTTP_ROUTES.encrypt,
  op: 'encrypt',
  help: '{"key_id","plaintext","aad"?} or {"batch_input":[...]} → {"ciphertext","key_version"}',
  jsonBody: true,
  handle: (input) =>
    runBatchRoute<EncryptItem, EncryptResult>(
      {
        parseItem: (raw) => {
          const f = parseItem(raw);
          return { keyId: f.key_id, plaintext: f.plaintext, aad: f.aad };
        },
        run: (items, caller) => input.services.kms.encryptBatch(items, caller),
        toWire: encryptResultToWire,
        toJson: encryptResultJson,
      },
      input,
    ),
};
