/**
 * Encryption off, then encrypt-threads turning that data dir into an encrypted one, with a kill -9
 * in the middle and writers running meanwhile.
 */
import path from 'node:path';
import test from 'ava';
import { missingOrWrong, seed, Traffic } from './helpers/load.js';
import { cleanEnv, until } from './helpers/processes.js';
import { filesContaining, runCli, SERVER_CLI, startServer } from './helpers/server.js';

test('encryption off: life cycle works and admin encryption operations answer 409', async (t) => {
  const server = await startServer({ mode: 'off' });
  t.teardown(() => server.stop());
  const { api, admin } = server;
  const created = await api.post('/v1/threads', {});
  t.is(created.status, 201);
  t.false(created.body.encrypted);
  const tid = created.body.id as string;
  const expected = await seed(api, tid, 5);
  const { problems, stored } = await missingOrWrong(api, tid, expected);
  t.deepEqual(problems, []);
  t.false([...stored.values()][0].encrypted);
  const [first] = expected.keys();
  t.is((await api.put(`/v1/threads/${tid}/messages/${first}`, { body: 'changed' })).body.body, 'changed');
  t.is((await api.delete(`/v1/threads/${tid}/messages/${first}`)).status, 204);
  t.is((await api.delete(`/v1/threads/${tid}`)).status, 204);
  t.is((await api.get(`/v1/threads/${tid}`)).status, 404);
  for (const reply of [
    await admin.post('/admin/encryption/encrypt-threads'),
    await admin.post('/admin/encryption/rotate-kek'),
    await admin.post('/admin/encryption/rotate-thread-dek', { thread_id: tid }),
  ]) {
    t.is(reply.status, 409);
    t.is(reply.body.error.code, 'CONFLICT');
  }
  t.is((await api.withKey(undefined).get('/healthz')).status, 200);
});

test('encrypt-threads on a plaintext data dir: survives kill -9, writers keep going, nothing lost', async (t) => {
  const marker = `PLAIN-${Date.now()}`;
  const plain = await startServer({ mode: 'off' });
  const threads: string[] = [];
  const expected = new Map<string, Map<string, unknown>>();
  for (let i = 0; i < 3; i++) {
    const tid = await plain.api.createThread(`thread ${i}`);
    threads.push(tid);
    expected.set(tid, await seed(plain.api, tid, 80, 8, (n) => ({ text: `${marker} ${i}/${n}` })));
  }
  await plain.stop();
  t.true(filesContaining(plain.dataDir, marker).length > 0, 'the bodies were stored in plaintext');

  const env = { PROGRESSDB_JOB_BATCH_SIZE: '8', PROGRESSDB_JOB_PAUSE_MS: '15' };
  const first = await plain.restart({ mode: 'embedded', env });
  // A thread written with encryption off gets its DEK on the first write after encryption is on.
  const traffic = new Traffic(first.api, threads[1]!, { writers: 2, tag: 'during' });
  t.is((await first.admin.post('/admin/encryption/encrypt-threads')).status, 202);
  const midway = await until('encrypt-threads to be under way', async () => {
    const s = await first.admin.get('/admin/encryption/encrypt-threads');
    return s.body.encrypted > 0 ? s.body : undefined;
  });
  await first.kill9();
  await traffic.stop();
  t.is(midway.state, 'running', 'killed in the middle of encrypt-threads');
  t.is(midway.total, 3, 'the job reports how many threads it has to do');

  const second = await first.restart({ mode: 'embedded', env });
  t.teardown(() => second.stop());
  const done = await until('the resumed encrypt-threads', async () => {
    const s = await second.admin.get('/admin/encryption/encrypt-threads');
    return s.body.state === 'completed' ? s.body : undefined;
  });
  t.is(done.encrypted, 240, 'each plaintext message encrypted exactly once across the crash');
  t.is(done.threads, 3);
  t.is(done.total, 3, 'the resumed job kept its total');

  for (const [id, body] of traffic.acked) expected.get(threads[1]!)!.set(id, body);
  for (const tid of threads) {
    const { problems, stored } = await missingOrWrong(second.api, tid, expected.get(tid)!);
    t.deepEqual(problems, [], `thread ${tid}`);
    t.true([...stored.values()].every((m) => m.encrypted === true));
    t.true((await second.api.get(`/v1/threads/${tid}`)).body.encrypted);
  }

  // A rotation now works on the converted threads, and the data dir can no longer run unencrypted.
  const rotated = await second.admin.post('/admin/encryption/rotate-thread-dek?wait=true', {
    thread_id: threads[0],
  });
  t.is(rotated.body.state, 'completed');
  await second.stop();
  const refused = await runCli(SERVER_CLI, [], {
    env: cleanEnv({
      PROGRESSDB_DATA_DIR: second.dataDir,
      PROGRESSDB_ADDR: '127.0.0.1:0',
      PROGRESSDB_USE_ENCRYPTION: 'false',
      PROGRESSDB_ADMIN_KEY: 'an-admin-key-long-enough',
    }),
    cwd: path.dirname(second.dataDir),
  });
  t.is(refused.code, 1);
  t.regex(refused.stderr, /CONFIG_INVALID: .*holds encrypted threads/);
});
