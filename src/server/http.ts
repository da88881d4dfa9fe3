/** Request plumbing shared by the routes: errors, JSON bodies, ids and paging parameters. */
import type { Context, Middleware } from 'koa';
import { type CodedError, errorBody, toCodedError, UserError } from '../errors.js';
import type { Logger } from '../log.js';
import { jsonDepthExceeds } from '../wire/json-depth.js';
import { isId } from './ids.js';

export const DEFAULT_PAGE_LIMIT = 50;
export const MAX_PAGE_LIMIT = 200;
/**
 * Deepest nesting a request body may have. Message bodies are the caller's own JSON, so this is
 * generous; it stays far below the ~4,000 levels at which JSON.stringify, the field policy walk
 * and the store's encoder run out of stack.
 */
export const MAX_BODY_DEPTH = 512;

/**
 * Turns anything thrown into `{"error":{"code","message"}}` with the code's status. Unknown errors
 * become INTERNAL with a generic message: their text (which might quote input) stays in the log.
 */
export function errorHandler(logger: Logger, onError: (err: CodedError) => void): Middleware {
  return async (ctx, next) => {
    try {
      await next();
      if (ctx.status === 404 && ctx.body === undefined) throw new UserError('NOT_FOUND', 'no such endpoint');
    } catch (thrown) {
      const err = fromKoa(thrown) ?? toCodedError(thrown);
      onError(err);
      if (err.status >= 500) {
        const cause = err.code === 'INTERNAL' ? (err.cause as Error | undefined) : undefined;
        // Name and stack only: never a body, a key or a message that could quote one.
        logger.error(
          {
            code: err.code,
            method: ctx.method,
            route: ctx.state.route,
            err: cause && { name: cause.name, stack: cause.stack },
          },
          err.code === 'INTERNAL' ? 'request failed' : err.message,
        );
      }
      ctx.status = err.status;
      ctx.body = errorBody(err);
    }
  };
}

/** Errors Koa itself raises (e.g. a malformed URL) carry an HTTP status we keep. */
function fromKoa(thrown: unknown): CodedError | undefined {
  const status = (thrown as { status?: unknown; expose?: unknown })?.status;
  if (typeof status !== 'number' || (thrown as { code?: unknown }).code !== undefined) return undefined;
  if (status === 405 || status === 501) return new UserError('METHOD_NOT_ALLOWED');
  if (status === 413) return new UserError('PAYLOAD_TOO_LARGE');
  if (status >= 400 && status < 500) return new UserError('INVALID_INPUT');
  return undefined;
}

/**
 * Reads a JSON request body of at most `limit` bytes. Refuses by Content-Length before reading when
 * it can, and stops reading as soon as the limit is passed otherwise.
 */
export async function readJson(ctx: Context, limit: number): Promise<unknown> {
  if (!ctx.is('application/json')) {
    throw new UserError('UNSUPPORTED_MEDIA_TYPE', 'send the body as Content-Type: application/json');
  }
  const declared = Number(ctx.get('content-length') || Number.NaN);
  if (declared > limit) throw new UserError('PAYLOAD_TOO_LARGE', `request body is over ${limit} bytes`);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of ctx.req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) {
      // Answer now; the rest of the upload is discarded with the connection.
      ctx.set('Connection', 'close');
      throw new UserError('PAYLOAD_TOO_LARGE', `request body is over ${limit} bytes`);
    }
    chunks.push(chunk);
  }
  if (size === 0) throw new UserError('INVALID_INPUT', 'request body is empty');
  const bytes = Buffer.concat(chunks, size);
  // Deep nesting is valid JSON, so it is an input error rather than MALFORMED_JSON.
  if (jsonDepthExceeds(bytes, MAX_BODY_DEPTH)) {
    throw new UserError('INVALID_INPUT', `request body is nested deeper than ${MAX_BODY_DEPTH} levels`);
  }
  try {
    return JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new UserError('MALFORMED_JSON');
  }
}

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** A route's `:name` id parameter, checked to be one of our ids. */
export function idParam(ctx: Context, name: string): string {
  const value = (ctx as Context & { params?: Record<string, string> }).params?.[name] ?? '';
  if (!isId(value)) throw new UserError('INVALID_INPUT', `${name} is not a valid id`);
  return value;
}

export interface Paging {
  limit: number;
  cursor: string | undefined;
}

/** `?limit=N&cursor=<id>`: limit is capped at MAX_PAGE_LIMIT; a non-positive or non-integer one is a 400. */
export function pagingParams(ctx: Context): Paging {
  const { limit: rawLimit, cursor } = ctx.query;
  let limit = DEFAULT_PAGE_LIMIT;
  if (rawLimit !== undefined) {
    if (typeof rawLimit !== 'string' || !/^\d{1,9}$/.test(rawLimit) || Number(rawLimit) < 1) {
      throw new UserError(
        'INVALID_INPUT',
        `limit must be a positive integer (at most ${MAX_PAGE_LIMIT} are returned)`,
      );
    }
    // Larger pages are capped rather than refused: the cap is a server limit, not a caller error.
    limit = Math.min(Number(rawLimit), MAX_PAGE_LIMIT);
  }
  if (cursor !== undefined && (typeof cursor !== 'string' || !isId(cursor))) {
    throw new UserError('INVALID_INPUT', 'cursor must be the next_cursor of a previous page');
  }
  return { limit, cursor };
}

/** `?wait=true` on admin jobs. */
export function wantsWait(ctx: Context): boolean {
  const w = ctx.query.wait;
  return w === 'true' || w === '1';
}
