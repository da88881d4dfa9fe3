/** POST /rewrap: rewraps every stored version of one DEK under the active KEK. */
import { dekInfoToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

// ProgressDB's Go server sends {"key_id","new_kek_hex"} here, expecting a rewrap under its own KEK.
// This KMS generates its KEKs itself and never accepts or reveals one, so a caller's KEK is
// refused (not silently ignored, which would look like a rotation to that key).
const parse = compileSchema(
  { key_id: { kind: 'id' } },
  {
    strict: true,
    unknownFieldHint:
      'the KEK never leaves the KMS and cannot be supplied; /rewrap rewraps under the active KEK, ' +
      'and POST /rotate_kek rotates to a new KEK the KMS generates',
  },
);

export const rewrapRoute: RouteSpec = {
  ...HTTP_ROUTES.rewrap,
  op: 'rewrap',
  help: '{"key_id"} → {"key_id","wrapped","kek_id","kek_version",...} wrapped under the active KEK',
  jsonBody: true,
  handle: async ({ body, services, caller }) =>
    jsonReply(dekInfoToWire(await services.kms.rewrapDek(parse(body).key_id, caller))),
};
