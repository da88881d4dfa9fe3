/**
 * GET /openapi.json: the server's OpenAPI document, built from the routes on first request. No key
 * needed, like /healthz: it describes the public API and holds nothing of the configuration.
 */
import { packageVersion } from '../../cli/version.js';
import { openApiShape } from '../../http/openapi.js';
import { serverOpenApi } from '../openapi.js';
import { type ServerRoute, serverRoute } from './route.js';

/** `routes` is read when the document is first asked for: it lists this route too. */
export function openApiRoute(routes: () => readonly ServerRoute[]): ServerRoute {
  let text: string | undefined;
  return serverRoute({
    method: 'GET',
    path: '/openapi.json',
    scope: 'public',
    help: "→ this API's OpenAPI 3.1 document; no key",
    reply: { schema: openApiShape },
    handle: (ctx) => {
      text ??= JSON.stringify(serverOpenApi(routes(), packageVersion()));
      ctx.type = 'application/json; charset=utf-8';
      ctx.body = text;
    },
  });
}
