/** The daemon's access log: route pattern, status, request id as answered; off by PROGRESSDB_KMS_ACCESS_LOG=false. */
import test from 'ava';
import { postJson, spawnDaemon } from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';

const access = (logs: string[]) =>
  logs.flatMap((l) => {
    try {
      const o = JSON.parse(l) as { msg?: string; reqId?: string; route?: string; status?: number };
      return o.msg === 'request' ? [o] : [];
    } catch {
      return [];
    }
  });

test('a daemon request is logged with route, status and the X-Request-Id it answered', async (t) => {
  const daemon = await spawnDaemon();
  try {
    const res = await fetch(`http://${daemon.http}/create_dek_for_thread`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ thread_id: 'secret-thread-marker' }),
    });
    await res.arrayBuffer();
    const id = res.headers.get('x-request-id');
    t.truthy(id);
    const lines = await until('an access line', () => {
      const got = access(daemon.logs);
      return got.length > 0 ? got : undefined;
    });
    t.like(lines[0], { reqId: id, route: '/create_dek_for_thread', status: 200 });
    t.false(daemon.logs.join('\n').includes('secret-thread-marker'));
  } finally {
    await daemon.kill9();
  }
});

test('PROGRESSDB_KMS_ACCESS_LOG=false logs no access lines', async (t) => {
  const daemon = await spawnDaemon({ env: { PROGRESSDB_KMS_ACCESS_LOG: 'false' } });
  try {
    await postJson(`http://${daemon.http}`, '/create_dek_for_thread', { thread_id: 'x' });
    t.deepEqual(access(daemon.logs), []);
  } finally {
    await daemon.kill9();
  }
});
