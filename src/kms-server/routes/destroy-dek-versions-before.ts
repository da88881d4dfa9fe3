/** POST /destroy_dek_versions_before: destroys versions older than keep_from_version. */
import { destroyResultToWire, HTTP_ROUTES } from '../../wire/http-json.js';
import { compileSchema, jsonReply, type RouteSpec } from '../route.js';

const parse = compileSchema(
  { key_id: { kind: 'id' }, keep_from_version: { kind: 'uint' } },
  { strict: true },
);

export const destroyDekVersionsBeforeRoute: RouteSpec = {
  ...HTTP_ROUTES.destroy_dek_versions_before,
  op: 'destroy_dek_versions_before',
  help: '{"key_id","keep_from_version"} → {"key_id","destroyed_versions"}',
  jsonBody: true,
  handle: async ({ body, services, caller }) => {
    const f = parse(body);
    return jsonReply(
      destroyResultToWire(await services.kms.destroyDekVersionsBefore(f.key_id, f.keep_from_version, caller)),
    );
  },
};
