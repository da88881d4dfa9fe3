/**
 * The server's OpenAPI document, derived from its routes (routes/): path, query and body schemas
 * are the zod schemas each route checks its input with, answers the schemas it declares.
 */
import { z } from 'zod';
import { type OperationDoc, openApiDocument } from '../http/openapi.js';
import type { ServerRoute } from './routes/route.js';

const SCHEMES = { data: 'apiKey', admin: 'adminKey' } as const;

/** `POST /v1/threads/:id/messages` → `post_v1_threads_id_messages`: unique as method and path are. */
function operationId(route: ServerRoute): string {
  return `${route.method.toLowerCase()}${route.path.replace(/[^A-Za-z0-9]+/g, '_')}`.replace(/_$/, '');
}

function operationOf(route: ServerRoute): OperationDoc {
  const { input, reply } = route;
  return {
    method: route.method,
    path: route.path,
    operationId: operationId(route),
    summary: route.help,
    security: route.scope === 'public' ? [] : [SCHEMES[route.scope]],
    pathParams: input.params,
    query: input.query,
    body: input.body && { schema: input.body, required: !input.bodyOptional },
    responses: (reply?.statuses ?? [200]).map((status) => ({
      status,
      description: route.help,
      ...(reply?.text !== undefined
        ? { text: reply.text }
        : status === 204
          ? {}
          : { json: reply?.schema ?? z.unknown() }),
    })),
  };
}

export function serverOpenApi(routes: readonly ServerRoute[], version: string): object {
  return openApiDocument(
    {
      title: 'ProgressDB server (progressdb)',
      version,
      description:
        'Threads and messages, message bodies encrypted at rest under per-thread keys, and the ' +
        'admin endpoints for rotation and encryption jobs.',
      securitySchemes: {
        apiKey: {
          type: 'http',
          scheme: 'bearer',
          description:
            'An API key from PROGRESSDB_API_KEYS (none needed when none are configured, loopback only)',
        },
        adminKey: { type: 'http', scheme: 'bearer', description: 'The admin key' },
      },
    },
    routes.map(operationOf),
  );
}
