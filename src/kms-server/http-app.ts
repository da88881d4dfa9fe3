/**
 * The daemon's Koa app: the access log (http/access-log.ts; off with access_log: false), then one
 * app-level middleware (errors, 404/405, draining) around one @koa/router layer holding a route
 * per endpoint. Per-request overhead matters here (the /encrypt benchmark is measured against a
 * bare Koa echo), so there are no other middleware; each route handler authenticates, reads its
 * body, runs, and records metrics.
 */
import Router from '@koa/router';
import Koa from 'koa';
import type { CallContext } from '../api/index.js';
import { kmsError, toCodedError } from '../errors.js';
import { accessLog } from '../http/access-log.js';
import { errorMiddleware, writeError } from '../http/errors.js';
import { isPlainObject, type JsonBodyLimits, readJsonBody } from '../http/json-body.js';
import type { Logger } from '../log.js';
import { type Authenticator, bearerToken } from './auth.js';
import type { RouteInput, RouteServices, RouteSpec } from './route.js';
import { ROUTES } from './routes/index.js';

const JSON_TYPE = 'application/json; charset=utf-8';
const PUBLIC_CALLER: CallContext = {};
const EMPTY_BODY: Record<string, unknown> = Object.freeze({}) as Record<string, unknown>;

export interface HttpAppDeps {
  services: RouteServices;
  auth: Authenticator;
  logger: Logger;
  /** One log line per request; off, the middleware is not registered at all. */
  accessLog?: boolean;
  /** True once shutdown began: answers carry Connection: close so keep-alive sockets drain. */
  draining(): boolean;
}

/**
 * Deepest nesting a daemon body may have. Every body is flat ({"batch_input":[{...}]} is 3
 * levels), so 64 leaves room for anything legitimate and keeps recursive code far from the stack.
 */
export const MAX_BODY_DEPTH = 64;

/** Every daemon body is a JSON object; an empty one is not JSON at all. */
async function readObjectBody(ctx: Koa.Context, limits: JsonBodyLimits): Promise<Record<string, unknown>> {
  const value = await readJsonBody(ctx.req, limits);
  if (value === undefined) throw kmsError('MALFORMED_JSON');
  if (!isPlainObject(value)) throw kmsError('INVALID_INPUT', 'request body must be a JSON object');
  return value;
}

function handlerOf(spec: RouteSpec, deps: HttpAppDeps): Koa.Middleware {
  const { services, auth, logger } = deps;
  const bodyLimits: JsonBodyLimits = { maxBytes: services.limits.maxBodyBytes, maxDepth: MAX_BODY_DEPTH };
  return async (ctx) => {
    const startedAt = performance.now();
    try {
      let caller = PUBLIC_CALLER;
      if (spec.public) auth.requireClientCertificate(ctx.req.socket);
      else caller = auth.authenticate(bearerToken(ctx.req.headers.authorization), ctx.req.socket);
      ctx.state.caller = caller;
      const input: RouteInput = {
        services,
        caller,
        body: spec.jsonBody ? await readObjectBody(ctx, bodyLimits) : EMPTY_BODY,
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
  const router = new Router();
  const methodsOfPath = new Map<string, string[]>();
  for (const spec of ROUTES) {
    const handler = handlerOf(spec, deps);
    if (spec.method === 'GET') router.get(spec.path, handler);
    else router.post(spec.path, handler);
    const methods = methodsOfPath.get(spec.path) ?? [];
    methods.push(spec.method, ...(spec.method === 'GET' ? ['HEAD'] : []));
    methodsOfPath.set(spec.path, methods);
  }
  const routes = router.routes();
  const answerErrors = errorMiddleware({
    // Every route handler sets a body, errors included: none means no route matched.
    unmatched: (ctx) => {
      const allowed = methodsOfPath.get(ctx.path.toLowerCase().replace(/(.)\/$/, '$1'));
      if (!allowed) return kmsError('NOT_FOUND', 'no such endpoint');
      ctx.set('Allow', allowed.join(', '));
      return kmsError('METHOD_NOT_ALLOWED', `${ctx.method} is not allowed on ${ctx.path}`);
    },
  });

  if (deps.accessLog ?? true) {
    app.use(
      accessLog({
        logger: deps.logger,
        callerOf: (ctx) => (ctx.state.caller as CallContext | undefined)?.caller,
      }),
    );
  }
  // One app-level middleware (the error answers wrap the router directly) keeps per-request cost low.
  app.use(async (ctx, next) => {
    await answerErrors(ctx, () => routes(ctx as Parameters<typeof routes>[0], next));
    if (deps.draining()) ctx.set('Connection', 'close');
  });
  return app;
}
