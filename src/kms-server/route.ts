/**
 * What a route declares (method, path, help, input schema, handler) and the small helpers routes
 * share: the batch runner through which single and batch requests take one code path, and
 * `opRoute`, which makes the route of a KMS operation from its declaration in src/ops/ (its
 * fields checked by a precompiled schema, src/http/field-schema.ts).
 */
import type { z } from 'zod';
import type { CallContext, ItemResult, Kms } from '../api/index.js';
import { errorBody, kmsError, toCodedError } from '../errors.js';
import { compileSchema, type SchemaOptions } from '../http/field-schema.js';
import { labelOf } from '../ops/index.js';
import type { AnyOp } from '../ops/op.js';
import type { DaemonMetrics } from './metrics.js';
import { opDoc } from './openapi.js';

export interface Limits {
  /** Largest HTTP request body, in bytes. */
  maxBodyBytes: number;
  /** Largest bridge frame, in bytes. */
  maxFrameBytes: number;
  /** Most items in one batch (HTTP batch_input or bridge encrypt/decrypt). */
  maxBatchItems: number;
}

export interface RouteServices {
  kms: Kms;
  metrics: DaemonMetrics;
  limits: Limits;
  /** False while starting or draining: health probes answer 503. */
  accepting(): boolean;
}

export interface RouteInput {
  services: RouteServices;
  caller: CallContext;
  /** Parsed JSON object body (POST routes with `jsonBody`), else {}. */
  body: Record<string, unknown>;
  query: Record<string, string | string[] | undefined>;
}

export type RouteReply = { json: unknown } | { status: number; contentType: string; text: string };

/** What the OpenAPI document says of a route beyond its method, path and help (openapi.ts). */
export interface RouteDoc {
  /** The JSON body (POST) or the query parameters (GET); none: the route reads neither. */
  input?: z.ZodType | undefined;
  /** The 200 answer: a JSON body's schema, or a text body's content type. */
  answer: { json: z.ZodType } | { text: string };
}

export interface RouteSpec {
  method: 'GET' | 'POST';
  path: string;
  /** One line for `progressdb-kms` docs and the 404 listing. */
  help: string;
  /** The typed operation this route runs (metrics label). */
  op: string;
  /** Probes (healthz, metrics) answer without authentication. */
  public?: boolean;
  /** Reads a JSON object body (415/413/400 checks apply). */
  jsonBody?: boolean;
  /** Built only when the OpenAPI document is first asked for. */
  doc?: () => RouteDoc;
  handle(input: RouteInput): Promise<RouteReply>;
}

// ---------------------------------------------------------------------------------------------
// Batch: a single request is a batch of one
// ---------------------------------------------------------------------------------------------

export interface BatchRoute<I, R> {
  parseItem: (input: unknown) => I;
  run: (items: I[], caller: CallContext) => Promise<ItemResult<R>[]>;
  toWire: (value: R) => Record<string, unknown>;
  /** Optional fast path: exactly JSON.stringify(toWire(value)). */
  toJson?: (value: R) => string;
}

const JSON_TYPE = 'application/json; charset=utf-8';

/**
 * `{...fields}` → one item, answered with its fields or its error status;
 * `{"batch_input":[...]}` → `{"batch_results":[...]}`, each item its result or `{"error":...}`.
 * Items that fail validation are answered in place; the rest go to the KMS in one call.
 */
export async function runBatchRoute<I, R>(route: BatchRoute<I, R>, input: RouteInput): Promise<RouteReply> {
  const body = input.body;
  const isBatch = Object.hasOwn(body, 'batch_input');
  const raw: unknown[] = isBatch ? (body.batch_input as unknown[]) : [body];
  if (!Array.isArray(raw)) throw kmsError('INVALID_INPUT', 'field "batch_input" must be an array');
  const max = input.services.limits.maxBatchItems;
  if (raw.length > max) {
    throw kmsError('PAYLOAD_TOO_LARGE', `batch of ${raw.length} items exceeds the limit of ${max}`, { max });
  }
  const results = new Array<ItemResult<R>>(raw.length);
  const valid: I[] = [];
  const positions: number[] = [];
  for (let i = 0; i < raw.length; i++) {
    try {
      valid.push(route.parseItem(raw[i]));
      positions.push(i);
    } catch (err) {
      results[i] = { ok: false, error: toCodedError(err) };
    }
    // The decoded item replaces its JSON text: with many batches in flight, holding every
    // base64 string until the answer keeps megabytes alive across young-generation GCs.
    raw[i] = undefined;
  }
  if (valid.length > 0) {
    const answered = await route.run(valid, input.caller);
    // biome-ignore lint/style/noNonNullAssertion: indexes within the batch: every position was answered, in order
    for (let j = 0; j < positions.length; j++) results[positions[j]!] = answered[j]!;
  }
  const toJson = route.toJson;
  if (!isBatch) {
    // biome-ignore lint/style/noNonNullAssertion: indexes within the batch: every position was answered, in order
    const only = results[0]!;
    if (!only.ok) throw only.error;
    if (toJson) return { status: 200, contentType: JSON_TYPE, text: toJson(only.value) };
    return { json: route.toWire(only.value) };
  }
  const metrics = input.services.metrics;
  if (toJson) {
    const parts = new Array<string>(results.length);
    for (let i = 0; i < results.length; i++) {
      // biome-ignore lint/style/noNonNullAssertion: indexes within the batch: every position was answered, in order
      const r = results[i]!;
      if (r.ok) parts[i] = toJson(r.value);
      else {
        metrics.itemError(r.error.code, 'http');
        parts[i] = JSON.stringify(errorBody(r.error));
      }
    }
    return { status: 200, contentType: JSON_TYPE, text: `{"batch_results":[${parts.join(',')}]}` };
  }
  const out = new Array<unknown>(results.length);
  for (let i = 0; i < results.length; i++) {
    // biome-ignore lint/style/noNonNullAssertion: indexes within the batch: every position was answered, in order
    const r = results[i]!;
    if (r.ok) {
      out[i] = route.toWire(r.value);
    } else {
      metrics.itemError(r.error.code, 'http');
      out[i] = errorBody(r.error);
    }
  }
  return { json: { batch_results: out } };
}

/** Shorthand for routes that answer one JSON object. */
export function jsonReply(value: unknown): RouteReply {
  return { json: value };
}

/** The HTTP route of a KMS operation: its parameters from the JSON body (POST) or query (GET). */
export function opRoute(spec: AnyOp): RouteSpec {
  const { method, path, help, strict, unknownFieldHint } = spec.http;
  const options: SchemaOptions = { strict: strict === true };
  if (unknownFieldHint !== undefined) options.unknownFieldHint = unknownFieldHint;
  const route = { method, path, help, op: labelOf(spec), doc: () => opDoc(spec) };
  if (spec.batch) {
    const parseItem = compileSchema(spec.json.item.schema, options);
    const { toWire, toJson } = spec.json.result;
    return {
      ...route,
      jsonBody: true,
      handle: (input) =>
        runBatchRoute<unknown, unknown>(
          {
            parseItem,
            run: (items, caller) => spec.run(input.services.kms, { items }, caller),
            toWire,
            ...(toJson === undefined ? {} : { toJson }),
          },
          input,
        ),
    };
  }
  const schema = spec.json.request.schema;
  const parse = Object.keys(schema).length === 0 ? () => ({}) : compileSchema(schema, options);
  const fromQuery = method === 'GET';
  const toWire = spec.json.result.toWire;
  return {
    ...route,
    // Ops without parameters read no body (POST /rotate_kek takes none).
    jsonBody: !fromQuery && Object.keys(schema).length > 0,
    handle: async ({ body, query, services, caller }) =>
      jsonReply(toWire(await spec.run(services.kms, parse(fromQuery ? query : body), caller))),
  };
}
