/**
 * GET /openapi.json: the daemon's OpenAPI document, built from the routes on first request. No
 * token needed, like /healthz and /metrics: it describes the public API and holds nothing of the
 * configuration, keys or tokens (a client certificate is still required under mutual TLS).
 */
import { packageVersion } from '../../cli/version.js';
import { openApiShape } from '../../http/openapi.js';
import { daemonOpenApi } from '../openapi.js';
import type { RouteSpec } from '../route.js';

/** `routes` is read when the document is first asked for: it lists this route too. */
export function openApiRoute(routes: () => readonly RouteSpec[]): RouteSpec {
  let text: string | undefined;
  return {
    method: 'GET',
    path: '/openapi.json',
    op: 'openapi',
    help: "→ this API's OpenAPI 3.1 document; no token",
    public: true,
    doc: () => ({ answer: { json: openApiShape } }),
    handle: async () => {
      text ??= JSON.stringify(daemonOpenApi(routes(), packageVersion()));
      return { status: 200, contentType: 'application/json; charset=utf-8', text };
    },
  };
}
