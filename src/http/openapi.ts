/**
 * The OpenAPI 3.1 document of an HTTP API, built from what its routes declare: their zod schemas,
 * turned into JSON Schema by z.toJSONSchema. One builder for both programs, so both documents give
 * errors, security and parameters the same form; nothing in it is written for one route.
 */
import { z } from 'zod';
import { ERROR_CATALOGUE, type ErrorCode } from '../errors.js';

export type HttpMethod = 'GET' | 'POST' | 'PUT' | 'DELETE';

export interface ResponseDoc {
  status: number;
  description: string;
  /** A JSON answer's schema, or a text answer's content type; neither: no body (204). */
  json?: z.ZodType;
  text?: string;
}

export interface OperationDoc {
  method: HttpMethod;
  /** As the router has it: `/v1/threads/:id`. */
  path: string;
  operationId: string;
  summary: string;
  /** Security schemes any one of which admits a caller; none: no credentials needed. */
  security: readonly string[];
  pathParams?: z.ZodType | undefined;
  query?: z.ZodType | undefined;
  body?: { schema: z.ZodType; required: boolean } | undefined;
  responses: readonly ResponseDoc[];
}

export interface ApiInfo {
  title: string;
  version: string;
  description: string;
  securitySchemes: Record<string, { type: string; scheme?: string; description: string }>;
}

type JsonSchema = Record<string, unknown>;

const CODES = Object.keys(ERROR_CATALOGUE) as [ErrorCode, ...ErrorCode[]];

/** Every error answer of both programs: `{"error":{"code","message"}}` (errors.ts). */
export const errorEnvelope = z.object({
  error: z.object({
    code: z
      .enum(CODES)
      .describe(
        `A stable code; its HTTP status: ${CODES.map((c) => `${c} ${ERROR_CATALOGUE[c].status}`).join(', ')}`,
      ),
    message: z.string().describe('Safe to show; never holds key material'),
  }),
});

/** The shape of an OpenAPI document itself, for the route that serves one. */
export const openApiShape = z.looseObject({
  openapi: z.string(),
  info: z.looseObject({ title: z.string(), version: z.string() }),
  paths: z.record(z.string(), z.unknown()),
});

/**
 * Requests as input (before transforms and defaults), answers as output: z.toJSONSchema then
 * closes output objects (additionalProperties: false), since an answer holds no other field.
 */
function jsonSchema(schema: z.ZodType, io: 'input' | 'output'): JsonSchema {
  const { $schema: _, ...rest } = z.toJSONSchema(schema, {
    target: 'draft-2020-12',
    io,
    unrepresentable: 'any',
  }) as JsonSchema;
  return rest;
}

/** An object schema's properties as path or query parameters. */
function parameters(schema: z.ZodType | undefined, where: 'path' | 'query'): object[] {
  if (schema === undefined) return [];
  const object = jsonSchema(schema, 'input');
  const required = new Set((object.required ?? []) as string[]);
  return Object.entries((object.properties ?? {}) as Record<string, JsonSchema>).map(([name, property]) => ({
    name,
    in: where,
    required: where === 'path' || required.has(name),
    schema: property,
  }));
}

function response(r: ResponseDoc): object {
  if (r.json !== undefined) {
    return {
      description: r.description,
      content: { 'application/json': { schema: jsonSchema(r.json, 'output') } },
    };
  }
  if (r.text !== undefined)
    return { description: r.description, content: { [r.text]: { schema: { type: 'string' } } } };
  return { description: r.description };
}

function operation(op: OperationDoc): object {
  const params = [...parameters(op.pathParams, 'path'), ...parameters(op.query, 'query')];
  return {
    operationId: op.operationId,
    summary: op.summary,
    security: op.security.map((name) => ({ [name]: [] })),
    ...(params.length > 0 && { parameters: params }),
    ...(op.body && {
      requestBody: {
        required: op.body.required,
        content: { 'application/json': { schema: jsonSchema(op.body.schema, 'input') } },
      },
    }),
    responses: {
      ...Object.fromEntries(op.responses.map((r) => [String(r.status), response(r)])),
      default: { $ref: '#/components/responses/Error' },
    },
  };
}

/** `/v1/threads/:id` → `/v1/threads/{id}`. */
export function openApiPath(routerPath: string): string {
  return routerPath.replace(/:([A-Za-z0-9_]+)/g, '{$1}');
}

export function openApiDocument(info: ApiInfo, operations: readonly OperationDoc[]): object {
  const paths: Record<string, Record<string, object>> = {};
  const ids = new Set<string>();
  for (const op of operations) {
    const item = (paths[openApiPath(op.path)] ??= {});
    const method = op.method.toLowerCase();
    if (item[method] !== undefined || ids.has(op.operationId)) {
      throw new Error(`two routes are documented as ${op.method} ${op.path} or ${op.operationId}`);
    }
    ids.add(op.operationId);
    item[method] = operation(op);
  }
  return {
    openapi: '3.1.0',
    info: { title: info.title, version: info.version, description: info.description },
    paths,
    components: {
      schemas: { Error: jsonSchema(errorEnvelope, 'output') },
      responses: {
        Error: {
          description: 'An error: its stable code (the status follows from it) and a message',
          content: { 'application/json': { schema: { $ref: '#/components/schemas/Error' } } },
        },
      },
      securitySchemes: info.securitySchemes,
    },
  };
}
