/**
 * How both HTTP programs answer an error: `{"error":{"code","message"}}` with the code's status,
 * from one middleware around the routes. Unknown errors become INTERNAL with a generic message:
 * their text (which might quote input) stays in the log.
 */
import type { Context, Middleware } from 'koa';
import { type CodedError, errorBody, kmsError, toCodedError } from '../errors.js';
import type { Logger } from '../log.js';

const JSON_TYPE = 'application/json; charset=utf-8';

export function writeError(ctx: Context, err: CodedError): void {
  ctx.status = err.status;
  ctx.set('Content-Type', JSON_TYPE);
  if (err.code === 'UNAUTHENTICATED') ctx.set('WWW-Authenticate', 'Bearer');
  // The rest of an unread body is never read: close instead of parsing it as the next request.
  if (err.code === 'PAYLOAD_TOO_LARGE' || err.code === 'UNSUPPORTED_MEDIA_TYPE') {
    ctx.set('Connection', 'close');
  }
  ctx.body = JSON.stringify(errorBody(err));
}

/** The route pattern @koa/router matched, for logs and metric labels. */
export function matchedRoute(ctx: Context): string {
  const route = (ctx as { _matchedRoute?: string | RegExp })._matchedRoute;
  return typeof route === 'string' ? route : 'unmatched';
}

/** Errors Koa itself raises (e.g. a malformed URL) carry an HTTP status we keep. */
function fromKoa(thrown: unknown): CodedError | undefined {
  const status = (thrown as { status?: unknown })?.status;
  if (typeof status !== 'number' || (thrown as { code?: unknown }).code !== undefined) return undefined;
  if (status === 405 || status === 501) return kmsError('METHOD_NOT_ALLOWED');
  if (status === 413) return kmsError('PAYLOAD_TOO_LARGE');
  if (status >= 400 && status < 500) return kmsError('INVALID_INPUT');
  return undefined;
}

export interface ErrorMiddlewareOptions {
  /** Logs 5xx answers: code, method, route, and the cause's name and stack only. */
  logger?: Logger;
  /** Told of every error answered (metrics). */
  onError?: (err: CodedError) => void;
  /** The error when no route answered: NOT_FOUND, or METHOD_NOT_ALLOWED for a known path. */
  unmatched?: (ctx: Context) => CodedError;
}

const notFound = () => kmsError('NOT_FOUND', 'no such endpoint');

export function errorMiddleware(options: ErrorMiddlewareOptions = {}): Middleware {
  const { logger, onError, unmatched = notFound } = options;
  return async (ctx, next) => {
    try {
      await next();
      if (ctx.status === 404 && ctx.body == null) throw unmatched(ctx);
    } catch (thrown) {
      const err = fromKoa(thrown) ?? toCodedError(thrown);
      onError?.(err);
      if (logger && err.status >= 500) {
        const cause = err.code === 'INTERNAL' ? (err.cause as Error | undefined) : undefined;
        // Name and stack only: never a body, a key or a message that could quote one.
        logger.error(
          {
            code: err.code,
            method: ctx.method,
            route: matchedRoute(ctx),
            err: cause && { name: cause.name, stack: cause.stack },
          },
          err.code === 'INTERNAL' ? 'request failed' : err.message,
        );
      }
      writeError(ctx, err);
    }
  };
}
