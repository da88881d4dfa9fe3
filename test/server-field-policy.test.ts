/**
 * The field policy against prototype keys: bodies are sent as raw JSON text, because JSON.parse
 * makes `"__proto__"` an own property (what a client sends) while an object literal would not.
 */
import path from 'node:path';
import test from 'ava';
import { open } from 'lmdb';
import { type Client, type Json, startServer } from './helpers/server.js';

const OVERLAPPING = { PROGRESSDB_ENCRYPTION_FIELDS: 'meta.*.*,meta.*' };

function postRaw(api: Client, threadId: string, bodyJson: string) {
  return api.request('POST', `/v1/threads/${threadId}/messages`, {
    raw: `{"body":${bodyJson}}`,
    headers: { 'content-type': 'application/json' },
  });
}

/** JSON text with object keys sorted (a field policy puts taken keys back last), own `__proto__` kept. */
function canonical(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  if (typeof value !== 'object' || value === null) return JSON.stringify(value);
  const entries = Object.keys(value)
    .sort()
    .map((k) => `${JSON.stringify(k)}:${canonical((value as Record<string, unknown>)[k])}`);
  return `{${entries.join(',')}}`;
}

async function storedBodyText(api: Client, threadId: string, messageId: string): Promise<string> {
  const r = await api.get(`/v1/threads/${threadId}/messages/${messageId}`);
  if (r.status !== 200) throw new Error(`get message: ${r.status} ${r.text}`);
  return canonical(r.body.body);
}

async function healthy(api: Client): Promise<number> {
  return (await api.withKey(undefined).get('/healthz')).status;
}

test('the __proto__ attack under overlapping patterns is a 400 and the server stays up', async (t) => {
  const server = await startServer({ env: OVERLAPPING });
  t.teardown(() => server.stop());
  const { api } = server;
  const tid = await api.createThread();

  const attack = await postRaw(api, tid, '{"meta":{"__proto__":{"polluted":"yes","then":1}}}');
  t.is(attack.status, 400);
  t.is(attack.body.error.code, 'INVALID_INPUT');
  t.regex(attack.body.error.message, /"body\.meta\.__proto__"/);
  t.is(await healthy(api), 200);

  // Overlapping patterns still give back exactly what was sent (the inner value is restored last).
  const body = { meta: { a: { b: 1, c: [2] }, d: 3 }, text: 'visible' };
  const ok = await api.postMessage(tid, body);
  t.is(ok.status, 201);
  t.deepEqual((await api.get(`/v1/threads/${tid}/messages/${ok.body.id}`)).body.body, body);
  t.deepEqual(
    (await api.allMessages(tid)).map((m) => m.id),
    [ok.body.id],
    'nothing of the refused body was stored',
  );
  t.is(await healthy(api), 200);
});

test('each prototype key on a policy path is a 400 naming the path, for new and updated messages', async (t) => {
  const server = await startServer({ env: { PROGRESSDB_ENCRYPTION_FIELDS: 'text,meta.*,list.*.url' } });
  t.teardown(() => server.stop());
  const { api } = server;
  const tid = await api.createThread();
  const original = (await api.postMessage(tid, { text: 'kept', meta: { a: 1 } })).body.id as string;

  const cases: [string, string][] = [
    ['{"meta":{"__proto__":{"x":1}}}', 'body.meta.__proto__'],
    ['{"meta":{"constructor":"x"}}', 'body.meta.constructor'],
    ['{"meta":{"prototype":1}}', 'body.meta.prototype'],
    // On the way to a policy path, not only at its end.
    ['{"list":{"__proto__":{"url":"x"}}}', 'body.list.__proto__'],
  ];
  for (const [bodyJson, fieldPath] of cases) {
    const created = await postRaw(api, tid, bodyJson);
    t.is(created.status, 400, bodyJson);
    t.is(created.body.error.code, 'INVALID_INPUT');
    t.true(created.body.error.message.includes(`"${fieldPath}"`), created.body.error.message);
    const updated = await api.request('PUT', `/v1/threads/${tid}/messages/${original}`, {
      raw: `{"body":${bodyJson}}`,
      headers: { 'content-type': 'application/json' },
    });
    t.is(updated.status, 400, bodyJson);
    t.is(updated.body.error.code, 'INVALID_INPUT');
  }
  const all = await api.allMessages(tid);
  t.deepEqual(
    all.map((m) => [m.id, m.body]),
    [[original, { text: 'kept', meta: { a: 1 } }]],
  );
  t.is(await healthy(api), 200);
});

test('prototype keys off the policy paths, and under whole-body encryption, round-trip unchanged', async (t) => {
  // `meta` is taken whole (its value is never walked); `other` is not under the policy at all.
  const bodyJson =
    '{"meta":{"__proto__":{"x":1}},"other":{"__proto__":{"y":2},"constructor":"c","prototype":[1]},"text":"secret"}';
  const withPolicy = await startServer({ env: { PROGRESSDB_ENCRYPTION_FIELDS: 'text,meta' } });
  const wholeBody = await startServer();
  t.teardown(() => Promise.all([withPolicy.stop(), wholeBody.stop()]));
  for (const server of [withPolicy, wholeBody]) {
    const { api } = server;
    const tid = await api.createThread();
    const r = await postRaw(api, tid, bodyJson);
    t.is(r.status, 201, r.text);
    t.true(r.body.encrypted);
    t.is(await storedBodyText(api, tid, r.body.id), bodyJson);
    t.is(canonical((await api.allMessages(tid))[0].body), bodyJson);
    t.is(await healthy(api), 200);
  }
});

test('a polluting message stored before the fix is read back without reaching a prototype', async (t) => {
  // The old code stored `{"meta":{"__proto__":{"polluted":...}}}` under `meta.*.*,meta.*` as this
  // ciphertext (the values taken out, in the order taken) and this rest. Whole-body encryption of
  // the same JSON makes the same ciphertext, so the record is built through the real server.
  const taken = [
    [['meta', '__proto__', 'polluted'], 'yes'],
    [['meta', '__proto__'], {}],
  ];
  // The same values in the other order: restoring it must not walk into an inherited __proto__.
  const reordered = [taken[1], taken[0]];
  const writer = await startServer();
  const tid = await writer.api.createThread();
  const asTaken = (await writer.api.postMessage(tid, taken)).body.id as string;
  const asReordered = (await writer.api.postMessage(tid, reordered)).body.id as string;
  await writer.stop();

  const root = open({ path: path.join(writer.dataDir, 'store'), maxDbs: 8, compression: false });
  const messages = root.openDB<Json, string>({ name: 'messages' });
  for (const mid of [asTaken, asReordered]) {
    await messages.put(`${tid}:${mid}`, { ...messages.get(`${tid}:${mid}`), rest: '{"meta":{}}' });
  }
  await root.close();

  const reader = await writer.restart({ env: OVERLAPPING });
  t.teardown(() => reader.stop());
  const { api } = reader;
  t.is(await storedBodyText(api, tid, asTaken), '{"meta":{"__proto__":{"polluted":"yes"}}}');
  t.is(await healthy(api), 200);
  t.is(await storedBodyText(api, tid, asReordered), '{"meta":{"__proto__":{}}}');
  const page = await api.get(`/v1/threads/${tid}/messages`);
  t.is(page.status, 200);
  t.is(page.body.messages.length, 2);
  t.is(await healthy(api), 200);
  t.is((await api.get(`/v1/threads/${tid}`)).status, 200);
});

test('encrypt-threads: a stored plaintext body with a prototype key on a policy path is encrypted whole', async (t) => {
  const bodyJson = '{"meta":{"__proto__":{"polluted":"yes"}},"text":"t"}';
  const plain = await startServer({ mode: 'off' });
  const tid = await plain.api.createThread();
  const mid = (await postRaw(plain.api, tid, bodyJson)).body.id as string;
  await plain.stop();

  const server = await plain.restart({ mode: 'embedded', env: OVERLAPPING });
  t.teardown(() => server.stop());
  const done = await server.admin.post('/admin/encryption/encrypt-threads?wait=true');
  t.is(done.status, 200, done.text);
  t.is(done.body.state, 'completed');
  t.is(done.body.encrypted, 1);
  t.deepEqual(done.body.undecryptable ?? [], []);
  const r = await server.api.get(`/v1/threads/${tid}/messages/${mid}`);
  t.true(r.body.encrypted);
  t.is(canonical(r.body.body), bodyJson);
  t.is(await healthy(server.api), 200);
});
