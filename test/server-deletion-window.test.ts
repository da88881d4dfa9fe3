/**
 * The server under the KMS's deletion window: deleting a thread hides it at once but keeps its
 * messages until the KMS destroys the key; an admin lists such threads and restores one (also
 * after a restart); once the window has ended the thread's records go.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { until } from './helpers/processes.js';
import { startServer } from './helpers/server.js';

test('a deleted thread is hidden, listed for the admin with its messages kept, and restored whole', async (t) => {
  let server = await startServer({ env: { PROGRESSDB_KMS_DELETION_WINDOW: '1h' } });
  t.teardown(() => server.stop());
  const tid = await server.api.createThread('keep me');
  const mid = (await server.api.postMessage(tid, { text: 'worth keeping' })).body.id as string;
  const before = Date.now();
  t.is((await server.api.delete(`/v1/threads/${tid}`)).status, 204);
  t.is((await server.api.get(`/v1/threads/${tid}`)).status, 404);
  t.false((await server.api.get('/v1/threads')).text.includes(tid));

  const listed = (await server.admin.get('/admin/threads/pending-deletion')).body.threads;
  t.like(listed, [{ id: tid, title: 'keep me', messages: 1 }]);
  const due = Date.parse(listed[0].deletion_due_at);
  t.true(due >= before + 3_600_000 - 60_000 && due <= Date.now() + 3_600_000);

  // Pending across a restart too; then restored, key and messages as they were.
  await server.stop();
  server = await server.restart();
  t.like((await server.admin.get('/admin/threads/pending-deletion')).body.threads, [{ id: tid }]);
  const restored = await server.admin.post('/admin/threads/restore', { thread_id: tid });
  t.is(restored.status, 200, restored.text);
  t.like(restored.body, { id: tid, title: 'keep me', encrypted: true });
  const message = await server.api.get(`/v1/threads/${tid}/messages/${mid}`);
  t.is(message.status, 200, message.text);
  t.deepEqual(message.body.body, { text: 'worth keeping' });
  t.deepEqual((await server.admin.get('/admin/threads/pending-deletion')).body.threads, []);
  const again = await server.admin.post('/admin/threads/restore', { thread_id: tid });
  t.is(again.status, 404);
  t.is(again.body.error.code, 'NOT_FOUND');
});

test('once the window has ended the key is destroyed and the thread purged', async (t) => {
  const server = await startServer({ env: { PROGRESSDB_KMS_DELETION_WINDOW: '1s' } });
  t.teardown(() => server.stop());
  const { api, admin } = server;
  const tid = await api.createThread();
  await api.postMessage(tid, { text: 'shredded later' });
  t.is((await api.delete(`/v1/threads/${tid}`)).status, 204);
  await until(
    'the purge',
    async () => {
      const { threads } = (await admin.get('/admin/threads/pending-deletion')).body;
      return threads.length === 0 ? true : undefined;
    },
    20_000,
  );
  t.is((await admin.post('/admin/threads/restore', { thread_id: tid })).status, 404);
  t.is((await api.get(`/v1/threads/${tid}/messages`)).status, 404);
  const audit = readFileSync(path.join(server.dataDir, 'kms', 'kms-audit.log'), 'utf8')
    .trim()
    .split('\n')
    .map((line) => JSON.parse(line) as { op: string; caller?: string; thread_id?: string; detail?: string });
  t.like(
    audit.find((l) => l.caller === 'kms-deletion-window'),
    { op: 'destroy_dek', thread_id: tid, detail: 'destroyed [1]' },
    'the KMS destroyed the key before the server purged the thread',
  );
});
