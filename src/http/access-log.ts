/**
 * One access log line per request, for both HTTP programs: request id (taken from a sane incoming
 * X-Request-Id, else made here, and always answered in X-Request-Id), method, the matched route
 * pattern (never the raw URL, whose ids and query strings could hold secrets), status, duration and
 * the caller the auth step resolved. Never a body or a header besides the request id. Registered
 * first, so error answers are logged with their final status. Successful /healthz and /metrics
 * probes go at debug: a probe every few seconds would otherwise bury the traffic; failing ones stay
 * at info.
 */
import { randomUUID } from 'node:crypto';
import type { Context, Middleware } from 'koa';
import type { Logger } from '../log.js';
import { matchedRoute } from './errors.js';

const SANE_ID = /^[A-Za-z0-9._:@+=/-]{1,128}$/;
const PROBES: ReadonlySet<string> = new Set(['/healthz', '/metrics']);

export interface AccessLogOptions {
  logger: Logger;
  /** The caller the route's auth step resolved, if any. */
  callerOf: (ctx: Context) => string | undefined;
}

export function accessLog({ logger, callerOf }: AccessLogOptions): Middleware {
  // A line holds only the fixed fields below, none of which can carry a secret, so the process
  // logger's wildcard redaction (a walk over every field) is skipped for it: it was ~10% of the
  // daemon's main thread under single-request load.
  const requests = logger.child({}, { redact: [] });
  return async (ctx, next) => {
    const start = performance.now();
    const incoming = ctx.get('x-request-id');
    const reqId = SANE_ID.test(incoming) ? incoming : randomUUID();
    ctx.set('X-Request-Id', reqId);
    let status: number | undefined;
    try {
      await next();
    } catch (thrown) {
      status = (thrown as { status?: number })?.status ?? 500;
      // Koa's own error answer drops every header set so far but the error's `headers`: the id
      // goes there, so even this answer can be matched to its log line.
      if (thrown instanceof Error) {
        const withHeaders = thrown as Error & { headers?: Record<string, string> };
        withHeaders.headers = { ...withHeaders.headers, 'X-Request-Id': reqId };
      }
      throw thrown;
    } finally {
      const route = matchedRoute(ctx);
      const line = {
        reqId,
        method: ctx.method,
        route,
        status: status ?? ctx.status,
        durationMs: Math.round((performance.now() - start) * 1000) / 1000,
        caller: callerOf(ctx),
        remoteAddress: ctx.ip,
      };
      if (PROBES.has(route) && line.status < 400) requests.debug(line, 'request');
      else requests.info(line, 'request');
    }
  };
}
