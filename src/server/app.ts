/** The Koa application: metrics, error mapping, then one route group per file. */
import Router from '@koa/router';
import Koa from 'koa';
import { UserError } from '../errors.js';
import type { AppParts } from './context.js';
import { errorHandler } from './http.js';
import { adminRoutes } from './routes/admin.js';
import { healthRoutes } from './routes/health.js';
import { messageRoutes } from './routes/messages.js';
import { threadRoutes } from './routes/threads.js';

export function createApp(parts: AppParts): Koa {
  const app = new Koa();
  // Every error is answered and logged by errorHandler; Koa's own stderr printer would duplicate it.
  app.silent = true;
  const router = new Router();
  for (const group of [healthRoutes, threadRoutes, messageRoutes, adminRoutes]) group(router, parts);

  const { metrics, logger } = parts;
  app.use(async (ctx, next) => {
    const start = performance.now();
    try {
      await next();
    } finally {
      ctx.set('Cache-Control', 'no-store');
      ctx.set('X-Content-Type-Options', 'nosniff');
      const route = (ctx as { _matchedRoute?: string | RegExp })._matchedRoute;
      metrics.requests.observe(
        {
          method: ctx.method,
          route: typeof route === 'string' ? route : 'unmatched',
          status: String(ctx.status),
        },
        (performance.now() - start) / 1000,
      );
    }
  });
  app.use(errorHandler(logger, (err) => metrics.errors.inc({ code: err.code })));
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
