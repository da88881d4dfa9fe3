/**
 * What a server endpoint declares, like the daemon's routes: method, path, the key it needs, a
 * one-line help, the zod schemas of its JSON body and query (and of its answer, for the OpenAPI
 * document), and a handler given their parsed values. `serverRoute` turns a declaration into the
 * form app.ts registers.
 */
import type { Context } from 'koa';
import type { z } from 'zod';
import { checkInput } from '../../http/check-input.js';
import type { Scope } from '../auth.js';
import type { AppParts } from '../context.js';
import { readJson } from '../http.js';

export type Method = 'GET' | 'POST' | 'PUT' | 'DELETE';

/** A route's success answer, as the OpenAPI document describes it (server/openapi.ts). */
export interface ReplyDoc {
  /** Its statuses; default [200]. */
  statuses?: readonly number[];
  /** Its JSON body; none: not described (or no body, for 204). */
  schema?: z.ZodType;
  /** A text answer's content type, instead of JSON. */
  text?: string;
}

interface RouteHead {
  method: Method;
  path: string;
  /** The key a caller needs (data: an API key; admin: the admin key); probes take none. */
  scope: Scope | 'public';
  /** One line for the docs. */
  help: string;
  reply?: ReplyDoc;
}

export interface ServerRoute extends RouteHead {
  /** The declaration's input schemas, kept for the OpenAPI document. */
  readonly input: {
    params?: z.ZodType | undefined;
    body?: z.ZodType | undefined;
    bodyOptional: boolean;
    query?: z.ZodType | undefined;
  };
  handle(ctx: Context, parts: AppParts): Promise<void> | void;
}

export interface RouteInput<P, B, Q> {
  params: P;
  body: B;
  query: Q;
}

/** Each part of the input is checked in this order: path parameters, body, query. */
export interface RouteDeclaration<P, B, Q> extends RouteHead {
  /** The path's `:name` parameters. */
  params?: z.ZodType<P>;
  /** The JSON body's schema; a route without one reads no body. */
  body?: z.ZodType<B>;
  /** A request that sends no body at all is given `{}` instead of being refused. */
  bodyOptional?: true;
  query?: z.ZodType<Q>;
  handle(ctx: Context, parts: AppParts, input: RouteInput<P, B, Q>): Promise<void> | void;
}

/** Whether the request carries a body at all (a declared length, or chunked). */
function sendsBody(ctx: Context): boolean {
  return ctx.request.length !== undefined ? ctx.request.length > 0 : ctx.get('transfer-encoding') !== '';
}

async function bodyOf(ctx: Context, parts: AppParts, schema: z.ZodType, optional: boolean): Promise<unknown> {
  const raw = optional && !sendsBody(ctx) ? {} : await readJson(ctx, parts.config.maxBodyBytes);
  return checkInput(schema, raw);
}

/** A part the route declares no schema for is undefined. */
function check<T>(schema: z.ZodType<T> | undefined, input: unknown): T {
  return (schema === undefined ? undefined : checkInput(schema, input)) as T;
}

export function serverRoute<P = undefined, B = undefined, Q = undefined>(
  decl: RouteDeclaration<P, B, Q>,
): ServerRoute {
  const { method, path, scope, help, reply } = decl;
  return {
    method,
    path,
    scope,
    help,
    ...(reply && { reply }),
    input: {
      params: decl.params,
      body: decl.body,
      bodyOptional: decl.bodyOptional === true,
      query: decl.query,
    },
    handle: async (ctx, parts) => {
      const params = check(decl.params, (ctx as Context & { params?: unknown }).params ?? {});
      const body = (
        decl.body === undefined ? undefined : await bodyOf(ctx, parts, decl.body, decl.bodyOptional === true)
      ) as B;
      const query = check(decl.query, ctx.query);
      await decl.handle(ctx, parts, { params, body, query });
    },
  };
}
