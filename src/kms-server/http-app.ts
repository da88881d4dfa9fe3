/**
 * The daemon's Koa app. Deliberately one app-level middleware (errors, 404/405, draining) that
 * finds the route in a map by path and method: per-request overhead matters here (the /encrypt
 * benchmark is measured against a bare Koa echo), and a general router builds a middleware chain
 * per request. Paths match like @koa/router's defaults did: case-insensitive, and an optional
 * trailing slash. Each route handler authenticates, reads its body, runs, and records metrics.
 */
import Koa from 'koa';
import { type CodedError, errorBody, kmsError, toCodedError } from '../errors.js';
import type { Logger } from '../log.js';
import type { CallContext } from '../protocol.js';
import { type Authenticator, bearerToken } from './auth.js';
import { readJsonBody } from './body.js';
import type { RouteInput, RouteServices, RouteSpec } from './route.js';
import { ROUTES } from './routes/index.js';

const JSON_TYPE = 'application/json; charset=utf-8';
const PUBLIC_CALLER: CallContext = {};
const EMPTY_BODY: Record<string, unknown> = Object.freeze({}) as Record<string, unknown>;

export interface HttpAppDeps {
  services: RouteServices;
  auth: Authenticator;
  logger: Logger;
  /** True once shutdown began: answers carry Connection: close so keep-alive sockets drain. */
  draining(): boolean;
}

function writeError(ctx: Koa.Context, err: CodedError): void {
  ctx.status = err.status;
  ctx.set('Content-Type', JSON_TYPE);
  if (err.code === 'UNAUTHENTICATED') ctx.set('WWW-Authenticate', 'Bearer');
  // The rest of an unread body is never read: close instead of parsing it as the next request.
  if (err.code === 'PAYLOAD_TOO_LARGE' || err.code === 'UNSUPPORTED_MEDIA_TYPE')
    ctx.set('Connection', 'close');
  ctx.body = JSON.stringify(errorBody(err));
}

function handlerOf(spec: RouteSpec, deps: HttpAppDeps): Koa.Middleware {
  const { services, auth, logger } = deps;
  const maxBody = services.limits.maxBodyBytes;
  return async (ctx) => {
    const startedAt = performance.now();
    try {
      let caller = PUBLIC_CALLER;
      if (spec.public) auth.requireClientCertificate(ctx.req.socket);
      else caller = auth.authenticate(bearerToken(ctx.req.headers.authorization), ctx.req.socket);
      const input: RouteInput = {
        services,
        caller,
        body: spec.jsonBody ? await readJsonBody(ctx.req, maxBody) : EMPTY_BODY,
        query: spec.method === 'GET' ? ctx.query : (EMPTY_BODY as RouteInput['query']),
      };
      const reply = await spec.handle(input);
      if ('json' in reply) {
        ctx.status = 200;
        ctx.set('Content-Type', JSON_TYPE);
        ctx.body = JSON.stringify(reply.json);
      } else {
        ctx.status = reply.status;
        ctx.set('Content-Type', reply.contentType);
        ctx.body = reply.text;
      }
      services.metrics.observe(spec.op, 'http', startedAt);
    } catch (thrown) {
      const err = toCodedError(thrown);
      if (err.code === 'INTERNAL') logger.error({ op: spec.op, err: err.cause ?? err }, 'request failed');
      services.metrics.observe(spec.op, 'http', startedAt, err);
      writeError(ctx, err);
    }
  };
}

export function createHttpApp(deps: HttpAppDeps): Koa {
  const app = new Koa();
  // Every error is answered by the middleware below; nothing reaches Koa's default stderr printer.
  app.silent = true;
  /** Path (lower case, no trailing slash) → method → handler; GET routes answer HEAD too. */
  const routes = new Map<string, Map<string, Koa.Middleware>>();
  for (const spec of ROUTES) {
    const handler = handlerOf(spec, deps);
    let byMethod = routes.get(spec.path);
    if (!byMethod) {
      byMethod = new Map();
      routes.set(spec.path.toLowerCase(), byMethod);
    }
    byMethod.set(spec.method, handler);
    if (spec.method === 'GET') byMethod.set('HEAD', handler);
  }
  const routeOf = (path: string): Map<string, Koa.Middleware> | undefined => {
    const exact = routes.get(path);
    if (exact) return exact;
    let p = path.toLowerCase();
    if (p.length > 1 && p.endsWith('/')) p = p.slice(0, -1);
    return routes.get(p);
  };

  app.use(async (ctx, next) => {
    try {
      const byMethod = routeOf(ctx.path);
      const handler = byMethod?.get(ctx.method);
      if (handler) await handler(ctx, next);
      else if (byMethod) {
        ctx.set('Allow', [...byMethod.keys()].join(', '));
        writeError(ctx, kmsError('METHOD_NOT_ALLOWED', `${ctx.method} is not allowed on ${ctx.path}`));
      } else {
        writeError(ctx, kmsError('NOT_FOUND', 'no such endpoint'));
      }
    } catch (thrown) {
      writeError(ctx, toCodedError(thrown));
    }
    if (deps.draining()) ctx.set('Connection', 'close');
  });
  return app;
}
