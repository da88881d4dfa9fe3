/**
 * External mode: the server talks to a real `progressdb-kms` daemon. The daemon is killed and
 * restarted under load: writes fail with 503 and store nothing, then everything recovers by itself.
 */
import test from 'ava';
import { missingOrWrong, seed, Traffic } from './helpers/load.js';
import { until } from './helpers/processes.js';
import { filesContaining, startKmsDaemon, startServer } from './helpers/server.js';

test('external KMS: life cycle, then the KMS killed and restarted under load', async (t) => {
  let daemon = await startKmsDaemon();
  t.teardown(() => daemon.kill9());
  const server = await startServer({ mode: 'external', kmsEndpoint: daemon.endpoint });
  t.teardown(() => server.stop());
  const { api, admin } = server;

  // Life cycle.
  const marker = `EXTERNAL-${Date.now()}`;
  const doomed = await api.createThread('to delete');
  const m = await api.postMessage(doomed, { text: marker });
  t.is(m.status, 201);
  t.deepEqual((await api.get(`/v1/threads/${doomed}/messages/${m.body.id}`)).body.body, { text: marker });
  t.is((await api.put(`/v1/threads/${doomed}/messages/${m.body.id}`, { body: 'edited' })).status, 200);
  t.is((await api.delete(`/v1/threads/${doomed}`)).status, 204);
  t.deepEqual(filesContaining(server.dataDir, marker), []);
  t.is((await admin.get('/admin/health')).body.kms.mode, 'external');
  const tid = await api.createThread('under load');
  const expected = await seed(api, tid, 40);
  const rotated = await admin.post('/admin/encryption/rotate-thread-dek?wait=true', { thread_id: tid });
  t.deepEqual(rotated.body.destroyed_versions, [1]);

  // The KMS goes away under load.
  const traffic = new Traffic(api, tid, { writers: 2, readers: 1 });
  await until('writes before the outage', () => (traffic.acked.size >= 20 ? true : undefined));
  await daemon.kill9();
  await until('/healthz to report 503', async () =>
    (await api.withKey(undefined).get('/healthz')).status === 503 ? true : undefined,
  );
  const during = await api.postMessage(tid, { text: 'while the KMS is down' });
  t.is(during.status, 503);
  t.is(during.body.error.code, 'KMS_UNAVAILABLE');
  const read = await api.get(`/v1/threads/${tid}/messages`);
  t.is(read.status, 503);
  const ackedBeforeRestart = traffic.acked.size;

  daemon = await daemon.restart();
  await until('/healthz to recover', async () =>
    (await api.withKey(undefined).get('/healthz')).status === 200 ? true : undefined,
  );
  await until('writes after the outage', () =>
    traffic.acked.size >= ackedBeforeRestart + 20 ? true : undefined,
  );
  await traffic.stop();

  t.deepEqual(
    [...traffic.writeStatuses.keys()].filter((s) => s !== 201 && s !== 503),
    [],
    'writes only ever succeeded or answered 503',
  );
  for (const [id, body] of traffic.acked) expected.set(id, body);
  const { problems, stored } = await missingOrWrong(api, tid, expected);
  t.deepEqual(problems, []);
  t.is(stored.size, expected.size, 'a write refused with 503 stored nothing');
});
