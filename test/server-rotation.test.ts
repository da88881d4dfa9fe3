/**
 * Key rotation online and crashes (kill -9) in the middle of writes and of a thread DEK rotation:
 * every acknowledged message must survive and decrypt.
 */
import test from 'ava';
import { missingOrWrong, seed, Traffic } from './helpers/load.js';
import { until } from './helpers/processes.js';
import { startServer } from './helpers/server.js';

test('thread DEK rotation and KEK rotation while a writer and a reader run lose nothing', async (t) => {
  const server = await startServer({
    env: { PROGRESSDB_JOB_BATCH_SIZE: '16', PROGRESSDB_JOB_PAUSE_MS: '2' },
  });
  t.teardown(() => server.stop());
  const { api, admin } = server;
  const tid = await api.createThread();
  const expected = await seed(api, tid, 150);
  const traffic = new Traffic(api, tid, { writers: 2, readers: 1 });

  const started = await admin.post('/admin/encryption/rotate-thread-dek', { thread_id: tid });
  t.is(started.status, 202);
  const first = await until('the DEK rotation', async () => {
    const s = await admin.get(`/admin/encryption/rotate-thread-dek?thread_id=${tid}`);
    return s.body.state === 'completed' ? s.body : undefined;
  });
  t.is(first.target_key_version, 2);
  t.deepEqual(first.destroyed_versions, [1], 'the old DEK version is destroyed once nothing uses it');

  const kek = await admin.post('/admin/encryption/rotate-kek?wait=true');
  t.is(kek.status, 200);
  t.is(kek.body.state, 'completed');
  t.is(kek.body.active_kek_version, 2);
  t.is((await admin.get('/admin/encryption/rotate-kek')).body.active_kek_version, 2);

  const second = await admin.post('/admin/encryption/rotate-thread-dek?wait=true', { thread_id: tid });
  t.is(second.status, 200);
  t.is(second.body.target_key_version, 3);
  t.deepEqual(second.body.destroyed_versions, [2]);

  await until('a few more writes after the rotations', () => (traffic.acked.size > 40 ? true : undefined));
  await traffic.stop();
  t.true(traffic.reads > 0);
  t.deepEqual(traffic.readProblems, [], 'reads kept working throughout');
  t.deepEqual([...traffic.writeStatuses.keys()], [201], 'writes kept working throughout');
  for (const [id, body] of traffic.acked) expected.set(id, body);
  const { problems, stored } = await missingOrWrong(api, tid, expected);
  t.deepEqual(problems, []);
  t.is(stored.size, expected.size);
});

test('kill -9 during message writes: every acknowledged message is present and decrypts', async (t) => {
  const server = await startServer();
  const tid = await server.api.createThread();
  const traffic = new Traffic(server.api, tid, { writers: 8 });
  await until('some acknowledged writes', () => (traffic.acked.size >= 150 ? true : undefined));
  await server.kill9();
  await traffic.stop();

  const again = await server.restart();
  t.teardown(() => again.stop());
  const { problems, stored } = await missingOrWrong(again.api, tid, traffic.acked);
  t.deepEqual(problems, [], 'no acknowledged message lost, no half-written message');
  t.true(stored.size >= traffic.acked.size);
});

test('kill -9 during a thread DEK rotation: the restart resumes it and nothing is lost', async (t) => {
  const env = { PROGRESSDB_JOB_BATCH_SIZE: '8', PROGRESSDB_JOB_PAUSE_MS: '15' };
  const server = await startServer({ env });
  const { api, admin } = server;
  const tid = await api.createThread();
  const expected = await seed(api, tid, 240);

  t.is((await admin.post('/admin/encryption/rotate-thread-dek', { thread_id: tid })).status, 202);
  const midway = await until('the rotation to be under way', async () => {
    const s = await admin.get(`/admin/encryption/rotate-thread-dek?thread_id=${tid}`);
    return s.body.reencrypted > 0 ? s.body : undefined;
  });
  await server.kill9();
  t.is(midway.state, 'running', 'killed in the middle of the rotation');

  const again = await server.restart({ env });
  t.teardown(() => again.stop());
  const done = await until('the resumed rotation', async () => {
    const s = await again.admin.get(`/admin/encryption/rotate-thread-dek?thread_id=${tid}`);
    return s.body.state === 'completed' ? s.body : undefined;
  });
  t.is(done.reencrypted, expected.size, 'each message re-encrypted exactly once across the crash');
  t.true(done.destroyed_versions.includes(1));
  const { problems } = await missingOrWrong(again.api, tid, expected);
  t.deepEqual(problems, []);
});
