/**
 * The server's access log: one line per request with the route pattern, status, caller and the
 * request id it answered in X-Request-Id, and no body content; PROGRESSDB_ACCESS_LOG=false turns it off.
 */
import test from 'ava';
import { until } from './helpers/processes.js';
import { startServer } from './helpers/server.js';

interface Line {
  msg?: string;
  reqId?: string;
  route?: string;
  status?: number;
  method?: string;
  caller?: string;
  durationMs?: number;
}

const lines = (stdout: string): Line[] =>
  stdout.split('\n').flatMap((l) => {
    try {
      return [JSON.parse(l) as Line];
    } catch {
      return [];
    }
  });

test('each request is logged with its route pattern, status, caller and request id', async (t) => {
  const server = await startServer({ mode: 'off' });
  try {
    const thread = await server.api.createThread('secret-title-marker');
    const res = await fetch(`${server.url}/v1/threads/${thread}`, {
      headers: { authorization: `Bearer ${server.options.keys.api}`, 'x-request-id': 'probe-42' },
    });
    await res.arrayBuffer();
    t.is(res.headers.get('x-request-id'), 'probe-42');
    const bad = await fetch(`${server.url}/v1/threads/${thread}`);
    await bad.arrayBuffer();
    const badId = bad.headers.get('x-request-id');
    t.truthy(badId);
    const got = await until('access lines', () => {
      const access = lines(server.output.stdout).filter((l) => l.msg === 'request');
      return access.length >= 3 ? access : undefined;
    });
    const ok = got.find((l) => l.reqId === 'probe-42');
    t.like(ok, { method: 'GET', route: '/v1/threads/:id', status: 200, caller: 'tester' });
    t.true(typeof ok?.durationMs === 'number');
    t.like(
      got.find((l) => l.reqId === badId),
      { route: '/v1/threads/:id', status: 401 },
    );
    t.false(server.output.stdout.includes('secret-title-marker'));
  } finally {
    await server.stop();
  }
});

test('PROGRESSDB_ACCESS_LOG=false logs no access lines', async (t) => {
  const server = await startServer({ mode: 'off', env: { PROGRESSDB_ACCESS_LOG: 'false' } });
  try {
    await server.api.createThread();
    t.deepEqual(
      lines(server.output.stdout).filter((l) => l.msg === 'request'),
      [],
    );
  } finally {
    await server.stop();
  }
});
