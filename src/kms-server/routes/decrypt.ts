/** POST /decrypt: decrypts with the DEK version named in the ciphertext; batchable. */
import type { DecryptItem } from '../../protocol.js';
import { HTTP_ROUTES, plaintextJson, plaintextToWire } from '../../wire/http-json.js';
import { compileSchema, type RouteSpec, runBatchRoute } from '../route.js';

const parseItem = compileSchema({
  key_id: { kind: 'id' },
  ciphertext: { kind: 'base64' },
  aad: { kind: 'base64', optional: true },
});

export const decryptRoute: RouteSpec = {
  ...HTTP_ROUTES.decrypt,
  op: 'decrypt',
  help: '{"key_id","ciphertext","aad"?} or {"batch_input":[...]} → {"plaintext"}',
  jsonBody: true,
  handle: (input) =>
    runBatchRoute<DecryptItem, Buffer>(
      {
        parseItem: (raw) => {
          const f = parseItem(raw);
          return { keyId: f.key_id, ciphertext: f.ciphertext, aad: f.aad };
        },
        run: (items, caller) => input.services.kms.decryptBatch(items, caller),
        toWire: plaintextToWire,
        toJson: plaintextJson,
      },
      input,
    ),
};
