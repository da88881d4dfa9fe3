/** The Koa application: metrics, error answers, then one route per endpoint (routes/index.ts). */
import Router from '@koa/router';
import Koa from 'koa';
import { UserError } from '../errors.js';
import { accessLog } from '../http/access-log.js';
import { errorMiddleware, matchedRoute } from '../http/errors.js';
import type { Caller } from './auth.js';
import type { AppParts } from './context.js';
import { ROUTES } from './routes/index.js';

function routerOf(parts: AppParts): Router {
  const router = new Router();
  for (const route of ROUTES) {
    const handler: Koa.Middleware = (ctx) => route.handle(ctx, parts);
    const chain = route.scope === 'public' ? [handler] : [parts.keys.require(route.scope), handler];
    router.register(route.path, [route.method], chain);
  }
  return router;
}

export function createApp(parts: AppParts): Koa {
  const app = new Koa();
  // Every error is answered and logged by errorMiddleware; Koa's own stderr printer would duplicate it.
  app.silent = true;
  const router = routerOf(parts);

  const { metrics, logger } = parts;
  if (parts.config.accessLog) {
    app.use(accessLog({ logger, callerOf: (ctx) => (ctx.state.caller as Caller | undefined)?.name }));
  }
  app.use(async (ctx, next) => {
    const start = performance.now();
    try {
      await next();
    } finally {
      ctx.set('Cache-Control', 'no-store');
      ctx.set('X-Content-Type-Options', 'nosniff');
      metrics.requests.observe(
        { method: ctx.method, route: matchedRoute(ctx), status: String(ctx.status) },
        (performance.now() - start) / 1000,
      );
    }
  });
  app.use(errorMiddleware({ logger, onError: (err) => metrics.errors.inc({ code: err.code }) }));
  app.use(router.routes());
  app.use(
    router.allowedMethods({
      throw: true,
      methodNotAllowed: () => new UserError('METHOD_NOT_ALLOWED'),
      notImplemented: () => new UserError('METHOD_NOT_ALLOWED'),
    }),
  );
  return app;
}
