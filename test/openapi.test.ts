/**
 * GET /openapi.json on a real daemon and a real server: an OpenAPI 3.1 document that lists every
 * route the program registers, each of which answers (none is the router's 404 or 405), and real
 * answers, successes and errors, that match the schemas it documents. Answers are checked with
 * zod's z.fromJSONSchema, the one schema library the project already has: no second validator.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { z } from 'zod';
import { openApiPath } from '../src/http/openapi.js';
import { ROUTES as DAEMON_ROUTES } from '../src/kms-server/routes/index.js';
import { ROUTES as SERVER_ROUTES } from '../src/server/routes/index.js';
import { ROOT } from './helpers/kms.js';
import { b64, type HttpReply, postJson, request, spawnDaemon } from './helpers/kms-daemon.js';
import { startServer } from './helpers/server.js';

const VERSION = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string })
  .version;

type Json = Record<string, unknown>;
interface Operation {
  responses: Record<string, Json>;
  requestBody?: Json;
}
interface Document {
  openapi: string;
  info: { version: string };
  paths: Record<string, Record<string, Operation>>;
  components: Json;
}

/** `{"$ref":"#/components/..."}` replaced by what it names, at any depth. */
function resolve(doc: Document, node: unknown): unknown {
  if (Array.isArray(node)) return node.map((n) => resolve(doc, n));
  if (typeof node !== 'object' || node === null) return node;
  const ref = (node as Json).$ref;
  if (typeof ref === 'string' && ref.startsWith('#/')) {
    const target = ref
      .slice(2)
      .split('/')
      .reduce<unknown>((at, part) => (at as Json)[part], doc);
    return resolve(doc, target);
  }
  return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, resolve(doc, v)]));
}

/** "GET /encrypt"-style names of every operation in the document. */
function operationsOf(doc: Document): string[] {
  return Object.entries(doc.paths).flatMap(([p, item]) =>
    Object.keys(item).map((m) => `${m.toUpperCase()} ${p}`),
  );
}

/** The documented answer for a status (the `default` when it is not listed): its JSON schema or content type. */
function documented(
  doc: Document,
  method: string,
  apiPath: string,
  status: number,
): { json?: z.ZodType; type: string } {
  const op = doc.paths[apiPath]?.[method.toLowerCase()];
  if (!op) throw new Error(`${method} ${apiPath} is not documented`);
  const answer = resolve(doc, op.responses[String(status)] ?? op.responses.default) as {
    content?: Record<string, { schema?: Json }>;
  };
  const [type, media] = Object.entries(answer.content ?? {})[0] ?? ['none', {}];
  if (type !== 'application/json') return { type };
  return { type, json: z.fromJSONSchema((media.schema ?? {}) as Parameters<typeof z.fromJSONSchema>[0]) };
}

/** Asserts a real answer is what the document says of its status. */
function conforms(
  t: ExecutionContext,
  doc: Document,
  method: string,
  apiPath: string,
  reply: HttpReply,
): void {
  const what = `${method} ${apiPath} → ${reply.status}`;
  const expected = documented(doc, method, apiPath, reply.status);
  if (expected.json === undefined) {
    if (expected.type === 'none') t.is(reply.text, '', what);
    else t.true(String(reply.headers['content-type']).startsWith(expected.type), what);
    return;
  }
  const checked = expected.json.safeParse(reply.json);
  t.true(checked.success, `${what}: ${checked.error?.message ?? ''} in ${reply.text.slice(0, 300)}`);
}

/** The router's own refusals, which a documented route must never get. */
const unrouted = (r: HttpReply) =>
  r.status === 405 || (r.status === 404 && r.json?.error?.message === 'no such endpoint');

function checkDocument(
  t: ExecutionContext,
  reply: HttpReply,
  routes: readonly { method: string; path: string }[],
) {
  t.is(reply.status, 200);
  const doc = reply.json as Document;
  t.regex(doc.openapi, /^3\.1\.\d+$/);
  t.is(doc.info.version, VERSION);
  t.deepEqual(operationsOf(doc).sort(), routes.map((r) => `${r.method} ${openApiPath(r.path)}`).sort());
  return doc;
}

test('the daemon documents the routes it serves, and its answers match the document', async (t) => {
  const daemon = await spawnDaemon();
  t.teardown(() => daemon.kill9());
  const base = `http://${daemon.http}`;
  const doc = checkDocument(t, await request(base, '/openapi.json'), DAEMON_ROUTES);
  for (const named of [
    'POST /encrypt',
    'POST /decrypt',
    'GET /get_wrapped',
    'GET /healthz',
    'GET /openapi.json',
  ]) {
    t.true(operationsOf(doc).includes(named), named);
  }

  const dek = await postJson(base, '/create_dek_for_thread', { thread_id: 'openapi-thread' });
  t.is(dek.status, 200);
  conforms(t, doc, 'POST', '/create_dek_for_thread', dek);
  const keyId = dek.json.key_id as string;
  const sealed = await postJson(base, '/encrypt', { key_id: keyId, plaintext: b64('hello') });
  t.is(sealed.status, 200);
  conforms(t, doc, 'POST', '/encrypt', sealed);
  const opened = await postJson(base, '/decrypt', { key_id: keyId, ciphertext: sealed.json.ciphertext });
  t.is(opened.status, 200);
  conforms(t, doc, 'POST', '/decrypt', opened);
  const batch = await postJson(base, '/encrypt', {
    batch_input: [
      { key_id: keyId, plaintext: b64('a') },
      { key_id: 'no-such-key', plaintext: b64('b') },
    ],
  });
  t.is(batch.json.batch_results[1].error.code, 'KEY_NOT_FOUND');
  conforms(t, doc, 'POST', '/encrypt', batch);
  const missing = await request(base, '/get_wrapped?key_id=no-such-key');
  t.is(missing.status, 404);
  conforms(t, doc, 'GET', '/get_wrapped', missing);
  const health = await request(base, '/health');
  conforms(t, doc, 'GET', '/health', health);

  // Every documented route answers as a route (an empty body is refused by the route, not the
  // router), and its answer, whatever it is, has the documented form. Last, as it includes
  // POST /rotate_kek, which starts a KEK rotation.
  for (const name of operationsOf(doc)) {
    const [method, apiPath] = name.split(' ') as [string, string];
    const reply =
      method === 'POST' ? await postJson(base, apiPath, {}) : await request(base, apiPath, { method });
    t.false(unrouted(reply), name);
    conforms(t, doc, method, apiPath, reply);
  }

  // The check is not vacuous: a wrong shape fails it.
  t.false(
    documented(doc, 'POST', '/encrypt', 200).json?.safeParse({ ciphertext: 'QQ==', key_version: 1 }).success,
  );
  t.false(
    documented(doc, 'GET', '/get_wrapped', 404).json?.safeParse({ error: { code: 'NOPE', message: '' } })
      .success,
  );
});

test('the server documents the routes it serves, and its answers match the document', async (t) => {
  const server = await startServer({ mode: 'off' });
  t.teardown(() => server.stop());
  const { api: apiKey, admin: adminKey } = server.options.keys;
  const doc = checkDocument(t, await request(server.url, '/openapi.json'), SERVER_ROUTES);
  for (const named of [
    'POST /v1/threads',
    'GET /v1/threads/{id}/messages',
    'GET /healthz',
    'GET /openapi.json',
  ]) {
    t.true(operationsOf(doc).includes(named), named);
  }

  const absentId = '01ARZ3NDEKTSV4RRFFQ69G5FAV';
  for (const name of operationsOf(doc)) {
    const [method, apiPath] = name.split(' ') as [string, string];
    const key = apiPath.startsWith('/admin') || apiPath === '/metrics' ? adminKey : apiKey;
    const reply = await request(server.url, apiPath.replace(/\{[a-z]+\}/g, absentId), {
      method,
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      ...(method === 'POST' || method === 'PUT' ? { body: '{}' } : {}),
    });
    t.false(unrouted(reply), name);
    conforms(t, doc, method, apiPath, reply);
  }

  const data = (method: string, p: string, body?: unknown) =>
    request(server.url, p, {
      method,
      headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    });
  const thread = await data('POST', '/v1/threads', { title: 'documented' });
  t.is(thread.status, 201);
  conforms(t, doc, 'POST', '/v1/threads', thread);
  const messages = `/v1/threads/${thread.json.id}/messages`;
  const message = await data('POST', messages, { body: { text: 'hi' } });
  t.is(message.status, 201);
  conforms(t, doc, 'POST', '/v1/threads/{id}/messages', message);
  conforms(t, doc, 'GET', '/v1/threads/{id}/messages', await data('GET', messages));
  conforms(
    t,
    doc,
    'GET',
    '/v1/threads/{id}/messages/{mid}',
    await data('GET', `${messages}/${message.json.id}`),
  );
  conforms(t, doc, 'GET', '/v1/threads', await data('GET', '/v1/threads?limit=1'));
  const refused = await data('POST', messages, { text: 'no body field' });
  t.is(refused.status, 400);
  conforms(t, doc, 'POST', '/v1/threads/{id}/messages', refused);
  const unauthenticated = await request(server.url, messages);
  t.is(unauthenticated.status, 401);
  conforms(t, doc, 'GET', '/v1/threads/{id}/messages', unauthenticated);
  conforms(t, doc, 'GET', '/healthz', await request(server.url, '/healthz'));
});
