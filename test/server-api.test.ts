/**
 * The server in embedded mode, over HTTP only: life cycle, paging, field policy, every error
 * status, no plaintext on disk, the AAD swap attack and crypto-shredding.
 */
import { cpSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { open } from 'lmdb';
import { filesContaining, type Json, type Reply, startServer, tempDir } from './helpers/server.js';

test('embedded: thread and message life cycle with paging, newest first', async (t) => {
  const server = await startServer();
  t.teardown(() => server.stop());
  const { api } = server;

  const created = await api.post('/v1/threads', { title: 'life cycle' });
  t.is(created.status, 201);
  t.true(created.body.encrypted);
  const tid = created.body.id as string;
  t.is((await api.get(`/v1/threads/${tid}`)).body.title, 'life cycle');

  const bodies = Array.from({ length: 7 }, (_, i) => ({
    n: i,
    text: `message ${i}`,
    nested: [i, { deep: true }],
  }));
  const ids: string[] = [];
  for (const body of bodies) {
    const r = await api.postMessage(tid, body);
    t.is(r.status, 201);
    t.deepEqual(r.body.body, body);
    ids.push(r.body.id);
  }
  // Ids sort by creation time, so the newest-first listing is the reverse of the write order.
  t.deepEqual([...ids].sort(), ids);

  const page1 = await api.get(`/v1/threads/${tid}/messages?limit=3`);
  t.is(page1.status, 200);
  t.deepEqual(
    page1.body.messages.map((m: { body: unknown }) => m.body),
    bodies.slice(4).reverse(),
  );
  const page2 = await api.get(`/v1/threads/${tid}/messages?limit=3&cursor=${page1.body.next_cursor}`);
  t.deepEqual(
    page2.body.messages.map((m: { id: string }) => m.id),
    ids.slice(1, 4).reverse(),
  );
  const all = await api.allMessages(tid, 3);
  t.deepEqual(
    all.map((m) => m.body),
    [...bodies].reverse(),
  );

  const one = await api.get(`/v1/threads/${tid}/messages/${ids[2]}`);
  t.deepEqual(one.body.body, bodies[2]);
  t.true(one.body.encrypted);

  const updated = await api.put(`/v1/threads/${tid}/messages/${ids[2]}`, { body: { edited: true } });
  t.is(updated.status, 200);
  t.deepEqual((await api.get(`/v1/threads/${tid}/messages/${ids[2]}`)).body.body, { edited: true });

  t.is((await api.delete(`/v1/threads/${tid}/messages/${ids[2]}`)).status, 204);
  t.is((await api.get(`/v1/threads/${tid}/messages/${ids[2]}`)).status, 404);
  t.is((await api.allMessages(tid)).length, 6);

  const listed = await api.get('/v1/threads?limit=200');
  t.true(listed.body.threads.some((th: { id: string }) => th.id === tid));

  t.is((await api.delete(`/v1/threads/${tid}`)).status, 204);
  t.is((await api.get(`/v1/threads/${tid}`)).status, 404);
  t.is((await api.get(`/v1/threads/${tid}/messages`)).status, 404);

  // Health, details and metrics.
  t.is((await api.withKey(undefined).get('/healthz')).status, 200);
  const health = await server.admin.get('/admin/health');
  t.is(health.status, 200);
  t.is(health.body.kms.mode, 'embedded');
  const metrics = await server.admin.get('/metrics');
  t.is(metrics.status, 200);
  t.regex(metrics.text, /progressdb_http_request_duration_seconds_bucket/);

  const stopped = await server.stop();
  t.is(stopped.code, 0, 'SIGTERM stops the server cleanly');
});

test('every error status, as {"error":{"code","message"}}', async (t) => {
  const server = await startServer({ env: { PROGRESSDB_MAX_BODY_BYTES: '4096' } });
  t.teardown(() => server.stop());
  const { api, admin } = server;
  const tid = await api.createThread();
  const mid = (await api.postMessage(tid, 'x')).body.id as string;
  const missing = '01ARZ3NDEKTSV4RRFFQ69G5FAV';

  const cases: [string, Promise<Reply>, number, string][] = [
    [
      'malformed JSON',
      api.request('POST', `/v1/threads/${tid}/messages`, {
        raw: '{"body":',
        headers: { 'content-type': 'application/json' },
      }),
      400,
      'MALFORMED_JSON',
    ],
    ['no body field', api.post(`/v1/threads/${tid}/messages`, { text: 'x' }), 400, 'INVALID_INPUT'],
    ['bad thread id', api.get('/v1/threads/not-an-id'), 400, 'INVALID_INPUT'],
    ['bad message id', api.get(`/v1/threads/${tid}/messages/not-an-id`), 400, 'INVALID_INPUT'],
    ['bad limit', api.get(`/v1/threads/${tid}/messages?limit=-1`), 400, 'INVALID_INPUT'],
    ['bad cursor', api.get(`/v1/threads/${tid}/messages?cursor=zzz`), 400, 'INVALID_INPUT'],
    ['bad title', api.post('/v1/threads', { title: 42 }), 400, 'INVALID_INPUT'],
    ['no key', api.withKey(undefined).get('/v1/threads'), 401, 'UNAUTHENTICATED'],
    ['wrong key', api.withKey('not-the-right-key-at-all').get('/v1/threads'), 401, 'UNAUTHENTICATED'],
    ['admin key on data', admin.get('/v1/threads'), 403, 'FORBIDDEN'],
    ['API key on admin', api.get('/admin/health'), 403, 'FORBIDDEN'],
    ['no key on metrics', api.withKey(undefined).get('/metrics'), 401, 'UNAUTHENTICATED'],
    ['unknown thread', api.get(`/v1/threads/${missing}`), 404, 'NOT_FOUND'],
    ['unknown message', api.get(`/v1/threads/${tid}/messages/${missing}`), 404, 'NOT_FOUND'],
    ['PUT unknown message', api.put(`/v1/threads/${tid}/messages/${missing}`, { body: 1 }), 404, 'NOT_FOUND'],
    ['unknown route', api.get('/v2/nothing'), 404, 'NOT_FOUND'],
    ['wrong method', api.request('PATCH', `/v1/threads/${tid}`), 405, 'METHOD_NOT_ALLOWED'],
    [
      'rotate unknown thread',
      admin.post('/admin/encryption/rotate-thread-dek', { thread_id: missing }),
      404,
      'NOT_FOUND',
    ],
    ['body too large', api.postMessage(tid, 'x'.repeat(5000)), 413, 'PAYLOAD_TOO_LARGE'],
    [
      'wrong content type',
      api.request('POST', `/v1/threads/${tid}/messages`, {
        raw: '{"body":1}',
        headers: { 'content-type': 'text/plain' },
      }),
      415,
      'UNSUPPORTED_MEDIA_TYPE',
    ],
  ];
  for (const [name, reply, status, code] of cases) {
    const r = await reply;
    t.is(r.status, status, name);
    t.is(r.body?.error?.code, code, name);
    t.is(typeof r.body?.error?.message, 'string', name);
  }
  // Input that is only valid for one route never turns into a 500 elsewhere.
  const weird = await api.request('POST', `/v1/threads/${tid}/messages`, {
    raw: Buffer.from([0xff, 0xfe, 0x00]),
    headers: { 'content-type': 'application/json' },
  });
  t.is(weird.status, 400);
  const huge = await api.get(`/v1/threads/${tid}/messages?limit=100000`);
  t.is(huge.status, 200, 'a large limit is capped, not refused');
  t.is((await api.get(`/v1/threads/${tid}/messages/${mid}`)).status, 200);
});

test('no plaintext body on disk; an AAD swap in LMDB fails with 422, not the wrong content', async (t) => {
  const server = await startServer();
  const { api } = server;
  const marker = `MARKER-${Date.now()}-plaintext`;
  const tid = await api.createThread();
  const other = await api.createThread();
  const a = (await api.postMessage(tid, { text: `${marker} A` })).body.id as string;
  const b = (await api.postMessage(tid, { text: `${marker} B` })).body.id as string;
  const c = (await api.postMessage(other, { text: `${marker} C` })).body.id as string;
  t.is((await server.stop()).code, 0);

  t.deepEqual(filesContaining(server.dataDir, marker), [], 'no file in the data dir holds a body');

  // Copy A's stored ciphertext onto B (same thread) and C's onto A (another thread).
  const root = open({ path: path.join(server.dataDir, 'store'), maxDbs: 8 });
  const messages = root.openDB<Json, string>({ name: 'messages' });
  const recA = messages.get(`${tid}:${a}`);
  const recC = messages.get(`${other}:${c}`);
  await messages.put(`${tid}:${b}`, { ...messages.get(`${tid}:${b}`), ct: recA.ct, kv: recA.kv });
  await messages.put(`${tid}:${a}`, { ...recA, ct: recC.ct, kv: recC.kv });
  await root.close();

  const again = await server.restart();
  t.teardown(() => again.stop());
  for (const id of [a, b]) {
    const r = await again.api.get(`/v1/threads/${tid}/messages/${id}`);
    t.is(r.status, 422, `swapped message ${id}`);
    t.is(r.body.error.code, 'DECRYPT_FAILED');
    t.false(r.text.includes(marker));
  }
  // In a page, each undecryptable message carries its own error; the page still answers.
  const page = await again.api.get(`/v1/threads/${tid}/messages`);
  t.is(page.status, 200);
  t.deepEqual(
    page.body.messages.map((m: { error?: { code: string } }) => m.error?.code),
    ['DECRYPT_FAILED', 'DECRYPT_FAILED'],
  );
  t.deepEqual((await again.api.get(`/v1/threads/${other}/messages/${c}`)).body.body, { text: `${marker} C` });
});

test('field policy: only the listed paths are encrypted; bodies round-trip', async (t) => {
  const server = await startServer({
    env: { PROGRESSDB_ENCRYPTION_FIELDS: 'body.text,body.attachments.*.url' },
  });
  const { api } = server;
  const tid = await api.createThread();
  const body = {
    text: 'SECRET-TEXT-FIELD',
    kind: 'visible-kind',
    attachments: [
      { url: 'https://SECRET-URL-1', name: 'one' },
      { name: 'no url' },
      { url: 'https://SECRET-URL-2' },
    ],
  };
  const id = (await api.postMessage(tid, body)).body.id as string;
  t.deepEqual((await api.get(`/v1/threads/${tid}/messages/${id}`)).body.body, body);
  t.deepEqual((await api.allMessages(tid))[0].body, body);
  // A body without those paths is stored and returned as is.
  const plainish = (await api.postMessage(tid, ['just', 'a', 'list'])).body.id as string;
  t.deepEqual((await api.get(`/v1/threads/${tid}/messages/${plainish}`)).body.body, ['just', 'a', 'list']);
  await server.stop();
  t.deepEqual(filesContaining(server.dataDir, 'SECRET-'), []);
  t.true(
    filesContaining(path.join(server.dataDir, 'store'), 'visible-kind').length > 0,
    'the rest stays readable',
  );
});

test('crypto-shredding: a deleted thread cannot be read even from an old copy of the store', async (t) => {
  const server = await startServer();
  const { api } = server;
  const tid = await api.createThread();
  const marker = `SHRED-${Date.now()}`;
  const mid = (await api.postMessage(tid, { text: marker })).body.id as string;
  await server.stop();
  const backup = tempDir('pdb-backup-');
  cpSync(path.join(server.dataDir, 'store'), backup, { recursive: true });

  const live = await server.restart();
  t.is((await live.api.delete(`/v1/threads/${tid}`)).status, 204);
  await live.stop();
  const audit = readFileSync(path.join(server.dataDir, 'kms', 'kms-audit.log'), 'utf8');
  t.regex(audit, /destroy/i, 'the KMS audit log records the destruction');

  // Restore the old store next to the current KMS: the records are back, the key is not.
  rmSync(path.join(server.dataDir, 'store'), { recursive: true });
  cpSync(backup, path.join(server.dataDir, 'store'), { recursive: true });
  const restored = await server.restart();
  t.teardown(() => restored.stop());
  const r = await restored.api.get(`/v1/threads/${tid}/messages/${mid}`);
  t.is(r.status, 404, r.text);
  t.is(r.body.error.code, 'KEY_NOT_FOUND');
  t.false(r.text.includes(marker));
  const page = await restored.api.get(`/v1/threads/${tid}/messages`);
  t.false(page.text.includes(marker));
  t.is(page.status, 200, page.text);
  t.is(page.body.messages[0].error.code, 'KEY_NOT_FOUND');
});

test('request bodies nested deeper than 512 levels are 400 INVALID_INPUT; at the limit they round-trip', async (t) => {
  const server = await startServer();
  t.teardown(() => server.stop());
  const { api } = server;
  const tid = await api.createThread('depth');
  // `{"body": ...}` is level 1, so the message body itself may open 511 more.
  const nested = (depth: number) => `${'['.repeat(depth)}${']'.repeat(depth)}`;
  const post = (body: string) =>
    api.request('POST', `/v1/threads/${tid}/messages`, {
      raw: `{"body":${body}}`,
      headers: { 'content-type': 'application/json' },
    });
  const atLimit = await post(nested(511));
  t.is(atLimit.status, 201, atLimit.text);
  const stored = await api.get(`/v1/threads/${tid}/messages/${atLimit.body.id}`);
  t.is(stored.status, 200);
  t.is(JSON.stringify(stored.body.body), nested(511));
  for (const depth of [512, 4200]) {
    const over = await post(nested(depth));
    t.is(over.status, 400, `depth ${depth + 1}`);
    t.is(over.body.error.code, 'INVALID_INPUT');
    t.regex(over.body.error.message, /nested deeper than 512 levels/);
  }
  const inStrings = { text: '['.repeat(5000), quoted: `\\"${'{'.repeat(600)}\\`, list: ['"[[\\', '{'] };
  const fine = await api.postMessage(tid, inStrings);
  t.is(fine.status, 201, fine.text);
  t.deepEqual(fine.body.body, inStrings);
});
