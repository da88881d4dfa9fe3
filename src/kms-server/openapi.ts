/**
 * The daemon's OpenAPI document, derived from its routes: an operation's request schema from the
 * field record its route checks requests with (src/ops/), its answer from the fields its result
 * record writes, so an op added to the catalogue is documented with nothing more to write.
 */
import { z } from 'zod';
import { type FieldKind, MAX_ID_LENGTH, type Schema, UINT_STRING } from '../http/field-schema.js';
import { errorEnvelope, type OperationDoc, openApiDocument } from '../http/openapi.js';
import type { Field, WireType } from '../ops/fields.js';
import type { AnyOp } from '../ops/op.js';
import type { RouteDoc, RouteSpec } from './route.js';

/** A request field as compileSchema accepts it. */
const INPUT: Record<FieldKind, () => z.ZodType> = {
  id: () => z.string().min(1).max(MAX_ID_LENGTH),
  base64: () => z.base64(),
  // A JSON number or, like every answer's numbers, a decimal string.
  uint: () => z.union([z.int().min(0), z.string().regex(UINT_STRING)]),
};

function inputSchema(schema: Schema, strict: boolean): z.ZodObject {
  const shape: Record<string, z.ZodType> = {};
  // compileSchema takes null for an absent optional field.
  for (const [name, f] of Object.entries(schema))
    shape[name] = f.optional ? INPUT[f.kind]().nullish() : INPUT[f.kind]();
  return strict ? z.strictObject(shape) : z.object(shape);
}

function wireSchema(type: WireType): z.ZodType {
  switch (type) {
    case 'string':
      return z.string();
    case 'decimal':
      return z.string().regex(/^\d+$/);
    case 'decimals':
      return z
        .string()
        .regex(/^(\d+(,\d+)*)?$/)
        .describe('comma-separated, "" for none');
    case 'base64':
      return z.base64();
    case 'boolean':
      return z.enum(['true', 'false']);
  }
  if ('oneOf' in type) return z.enum(type.oneOf as [string, ...string[]]);
  return objectSchema(type.object);
}

/** The JSON object of `fields`; any object when they are not known. */
function objectSchema(fields: readonly Field<unknown>[] | undefined): z.ZodObject {
  if (fields === undefined) return z.looseObject({});
  const shape: Record<string, z.ZodType> = {};
  for (const f of fields) shape[f.name] = f.optional ? wireSchema(f.type).optional() : wireSchema(f.type);
  return z.object(shape);
}

/** A KMS operation's request and answer; a batch op takes and answers one item or a batch. */
export function opDoc(op: AnyOp): RouteDoc {
  const strict = op.http.strict === true;
  if (op.batch) {
    const item = inputSchema(op.json.item.schema, strict);
    const result = objectSchema(op.json.result.fields);
    return {
      input: z.union([item, z.object({ batch_input: z.array(item) })]),
      answer: {
        json: z.union([result, z.object({ batch_results: z.array(z.union([result, errorEnvelope])) })]),
      },
    };
  }
  const params = op.json.request.schema;
  return {
    input: Object.keys(params).length > 0 ? inputSchema(params, strict) : undefined,
    answer: { json: objectSchema(op.json.result.fields) },
  };
}

const CALLER = ['bearerToken', 'clientCertificate'];

function operationOf(route: RouteSpec): OperationDoc {
  const doc = route.doc?.();
  const input = doc?.input;
  const answer = doc?.answer ?? { json: z.unknown() };
  return {
    method: route.method,
    path: route.path,
    operationId: route.op,
    summary: route.help,
    security: route.public ? [] : CALLER,
    query: route.method === 'GET' ? input : undefined,
    body: route.method === 'POST' && input !== undefined ? { schema: input, required: true } : undefined,
    responses: [{ status: 200, description: route.help, ...answer }],
  };
}

export function daemonOpenApi(routes: readonly RouteSpec[], version: string): object {
  return openApiDocument(
    {
      title: 'ProgressDB KMS daemon (progressdb-kms)',
      version,
      description:
        'Envelope encryption over HTTP: every value is a JSON string (numbers in decimal, bytes in ' +
        'standard base64). Who may call depends on the configuration: a bearer token, a client ' +
        'certificate (with tls.ca_file, required on every route, probes included), an address in ' +
        'allowed_networks, or anyone on a loopback listener without tokens.',
      securitySchemes: {
        bearerToken: { type: 'http', scheme: 'bearer', description: 'A token from the `tokens` setting' },
        clientCertificate: {
          type: 'mutualTLS',
          description: 'A client certificate signed by tls.ca_file',
        },
      },
    },
    routes.map(operationOf),
  );
}
