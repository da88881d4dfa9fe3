/** The server's request limits and the schemas its routes share: JSON bodies, ids, paging. */
import type { Context } from 'koa';
import { z } from 'zod';
import { UserError } from '../errors.js';
import { readJsonBody } from '../http/json-body.js';
import { ID_PATTERN } from './ids.js';

export const DEFAULT_PAGE_LIMIT = 50;
export const MAX_PAGE_LIMIT = 200;
/**
 * Deepest nesting a request body may have. Message bodies are the caller's own JSON, so this is
 * generous; it stays far below the ~4,000 levels at which JSON.stringify, the field policy walk
 * and the store's encoder run out of stack.
 */
export const MAX_BODY_DEPTH = 512;

/** A JSON request body of at most `limit` bytes; an empty one is refused. */
export async function readJson(ctx: Context, limit: number): Promise<unknown> {
  const value = await readJsonBody(ctx.req, { maxBytes: limit, maxDepth: MAX_BODY_DEPTH });
  if (value === undefined) throw new UserError('INVALID_INPUT', 'request body is empty');
  return value;
}

/** One of our ids (a thread or message id), refused with `message`. */
export function idSchema(message: string) {
  // A pattern rather than a refinement, so the OpenAPI document shows it.
  return z.string({ error: message }).regex(ID_PATTERN, { error: message });
}

/** A route's `:name` id parameter. */
export function idParamSchema(name: string) {
  return idSchema(`${name} is not a valid id`);
}

const LIMIT_MESSAGE = `limit must be a positive integer (at most ${MAX_PAGE_LIMIT} are returned)`;
const CURSOR_MESSAGE = 'cursor must be the next_cursor of a previous page';

/** `?limit=N&cursor=<id>`: limit is capped at MAX_PAGE_LIMIT; a non-positive or non-integer one is a 400. */
export const pagingQuery = z.object({
  limit: z
    .string({ error: LIMIT_MESSAGE })
    .regex(/^\d{1,9}$/, { error: LIMIT_MESSAGE })
    .transform(Number)
    .refine((n) => n >= 1, { error: LIMIT_MESSAGE })
    // Larger pages are capped rather than refused: the cap is a server limit, not a caller error.
    .transform((n) => Math.min(n, MAX_PAGE_LIMIT))
    .default(DEFAULT_PAGE_LIMIT),
  cursor: idSchema(CURSOR_MESSAGE).optional(),
});
