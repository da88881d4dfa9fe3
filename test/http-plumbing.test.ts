/**
 * The HTTP plumbing both programs share (src/http/), in-process on a bare Koa app: the JSON body
 * reader's refusals and their stable codes, the error answers, the zod input check, and the one
 * rotation-status view the server shows beside the record the daemon writes.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import test from 'ava';
import Koa from 'koa';
import { z } from 'zod';
import type { RotationStatus } from '../src/api/index.js';
import { type CodedError, UserError } from '../src/errors.js';
import { checkInput } from '../src/http/check-input.js';
import { errorMiddleware } from '../src/http/errors.js';
import { readJsonBody } from '../src/http/json-body.js';
import { rotationStatusRecord, rotationStatusView } from '../src/ops/shapes.js';

const LIMITS = { maxBytes: 64, maxDepth: 3 };

let base = '';
const server = http.createServer();

test.before(async () => {
  const app = new Koa();
  app.silent = true;
  app.use(errorMiddleware());
  app.use(async (ctx) => {
    if (ctx.path !== '/echo') return;
    const value = await readJsonBody(ctx.req, LIMITS);
    ctx.body = { value: value === undefined ? 'EMPTY' : value };
  });
  server.on('request', app.callback());
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

test.after.always(() => new Promise<void>((resolve) => server.close(() => resolve())));

interface Answer {
  value?: unknown;
  error: { code: string; message: string };
}

async function post(body: string, headers: Record<string, string> = { 'content-type': 'application/json' }) {
  const res = await fetch(`${base}/echo`, { method: 'POST', headers, body });
  return { status: res.status, json: (await res.json()) as Answer };
}

test('a JSON body is parsed; an empty one is left to the route', async (t) => {
  t.deepEqual((await post('{"a":[1]}')).json, { value: { a: [1] } });
  t.deepEqual((await post('[1,2]', { 'content-type': 'application/json; charset=utf-8' })).json, {
    value: [1, 2],
  });
  t.deepEqual((await post('')).json, { value: 'EMPTY' });
});

test('refusals carry a stable code and status', async (t) => {
  const cases: [string, Record<string, string> | undefined, number, string][] = [
    ['{"a":', undefined, 400, 'MALFORMED_JSON'],
    ['[[[[1]]]]', undefined, 400, 'INVALID_INPUT'],
    ['{"a":1}', { 'content-type': 'text/plain' }, 415, 'UNSUPPORTED_MEDIA_TYPE'],
    [`"${'x'.repeat(100)}"`, undefined, 413, 'PAYLOAD_TOO_LARGE'],
  ];
  for (const [body, headers, status, code] of cases) {
    const res = await post(body, headers);
    t.is(res.status, status, code);
    t.is(res.json.error.code, code);
    t.is(typeof res.json.error.message, 'string');
  }
  // Brackets inside strings are not nesting.
  t.is((await post('["[[[[[["]')).status, 200);
});

test('a body over the limit is refused while streaming, and the connection is closed', async (t) => {
  const res = await fetch(`${base}/echo`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: new ReadableStream({
      start(c) {
        c.enqueue(new TextEncoder().encode(`"${'x'.repeat(100)}"`));
        c.close();
      },
    }),
    duplex: 'half',
  } as RequestInit);
  t.is(res.status, 413);
  t.is(res.headers.get('connection'), 'close');
});

test('no route answering is NOT_FOUND in the error shape', async (t) => {
  const res = await fetch(`${base}/nothing`);
  t.is(res.status, 404);
  t.deepEqual(await res.json(), { error: { code: 'NOT_FOUND', message: 'no such endpoint' } });
});

test('checkInput: the schema’s words, or the unknown field named', (t) => {
  const schema = z.strictObject({ n: z.number({ error: 'n must be a number' }) });
  t.deepEqual(checkInput(schema, { n: 1 }), { n: 1 });
  const wrong = t.throws(() => checkInput(schema, { n: 'x' }), { instanceOf: UserError });
  t.is(wrong?.message, 'n must be a number');
  t.is((wrong as CodedError).code, 'INVALID_INPUT');
  t.is(t.throws(() => checkInput(schema, { n: 1, extra: 2 }))?.message, 'unknown field "extra"');
});

test('the server’s rotation view has the daemon’s fields in its order, with native JSON values', (t) => {
  const running: RotationStatus = {
    state: 'running',
    kekId: 'kek_1',
    activeKekVersion: 1,
    targetKekVersion: 2,
    done: 3,
    total: 10,
    startedAt: '2026-01-01T00:00:00.000Z',
    finishedAt: null,
    kekVersions: [1, 2],
  };
  const view = rotationStatusView(running);
  const wire = rotationStatusRecord.toWire(running);
  t.deepEqual(
    Object.keys(view).filter((k) => k in wire),
    Object.keys(wire),
  );
  t.deepEqual(view, {
    state: 'running',
    kek_id: 'kek_1',
    active_kek_version: 1,
    done: 3,
    total: 10,
    kek_versions: [1, 2],
    target_kek_version: 2,
    started_at: '2026-01-01T00:00:00.000Z',
    finished_at: null,
  });
  t.is(wire.done, '3', 'the daemon sends every value as a string');
});
