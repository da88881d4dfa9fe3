/**
 * The access log's less travelled paths, in-process (no child processes): a handler that throws
 * past every error middleware is logged with the status Koa answers; probes that succeed go at
 * debug and failing ones at info; a daemon 4xx is one info line with its route; and
 * `access_log: false` in either program's config file logs no request lines at all.
 */
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import Router from '@koa/router';
import test from 'ava';
import Koa from 'koa';
import { pino } from 'pino';
import type { Kms, KmsHealth } from '../src/api/index.js';
import { loadDaemonConfig } from '../src/config/daemon.js';
import { loadConfig } from '../src/config/server.js';
import { kmsError } from '../src/errors.js';
import { accessLog } from '../src/http/access-log.js';
import { startDaemon } from '../src/kms-server/serve.js';
import type { Logger } from '../src/log.js';
import { startServer } from '../src/server/index.js';
import { tempDir } from './helpers/kms.js';
import { postJson, request } from './helpers/kms-daemon.js';
import { stubHealth } from './helpers/stub-kms.js';

interface Line {
  level: number;
  msg?: string;
  reqId?: string;
  method?: string;
  route?: string;
  status?: number;
}

const DEBUG = 20;
const INFO = 30;

/** A debug-level logger whose lines land, parsed, in `lines` as they are written. */
function capture(): { logger: Logger; lines: Line[]; requests: () => Line[] } {
  const lines: Line[] = [];
  const logger = pino({ level: 'debug' }, { write: (text: string) => void lines.push(JSON.parse(text)) });
  return { logger, lines, requests: () => lines.filter((l) => l.msg === 'request') };
}

/** Enough of a Kms for the daemon's probes and input checks; `ready` decides health's `ok`. */
function probeKms(state: { ready: boolean }): Kms {
  const health = async (): Promise<KmsHealth> => stubHealth(state.ready);
  // The routes exercised here reach no other method: a call to one fails the request loudly. Not
  // a thenable (no `then`), or the async factory that returns it would wait on it forever.
  return new Proxy({ health, close: async () => {} } as Partial<Kms>, {
    get: (target, prop) =>
      prop === 'then'
        ? undefined
        : (target[prop as keyof Kms] ?? (() => Promise.reject(new Error(`stub: ${String(prop)}`)))),
  }) as Kms;
}

async function listen(app: Koa): Promise<{ base: string; close: () => Promise<void> }> {
  const server = http.createServer(app.callback());
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    base: `http://127.0.0.1:${port}`,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

test('a handler that throws past every error middleware is logged with the status answered', async (t) => {
  const { logger, requests } = capture();
  const app = new Koa();
  app.silent = true;
  app.use(accessLog({ logger, callerOf: () => 'tester' }));
  const router = new Router();
  router.post('/conflict', () => {
    throw kmsError('CONFLICT');
  });
  router.get('/bug', () => {
    throw new Error('a bug with no status');
  });
  app.use(router.routes());
  const server = await listen(app);
  t.teardown(server.close);

  const conflict = await fetch(`${server.base}/conflict`, { method: 'POST' });
  await conflict.arrayBuffer();
  const bug = await fetch(`${server.base}/bug`, { headers: { 'x-request-id': 'bug-1' } });
  await bug.arrayBuffer();
  t.is(conflict.status, 409);
  t.is(bug.status, 500);
  // Koa's error answer drops the headers set before the throw; the id is answered all the same.
  t.is(bug.headers.get('x-request-id'), 'bug-1');
  t.truthy(conflict.headers.get('x-request-id'));
  const lines = requests();
  t.like(
    lines.find((l) => l.reqId === conflict.headers.get('x-request-id')),
    { level: INFO, method: 'POST', route: '/conflict', status: 409 },
  );
  t.like(
    lines.find((l) => l.reqId === 'bug-1'),
    { level: INFO, method: 'GET', route: '/bug', status: 500 },
  );
});

test('daemon: passing probes log at debug, a failing probe and a 4xx at info, each with its route', async (t) => {
  const { logger, requests } = capture();
  const state = { ready: true };
  const config = loadDaemonConfig({ listen: '127.0.0.1:0', dataDir: 'unused-by-the-stub' });
  const daemon = await startDaemon(config, logger, async () => probeKms(state));
  t.teardown(() => daemon.close());
  const base = `http://127.0.0.1:${daemon.http.port}`;

  t.is((await request(base, '/healthz')).status, 200);
  t.is((await request(base, '/metrics')).status, 200);
  state.ready = false;
  t.is((await request(base, '/healthz')).status, 503);
  const refused = await postJson(base, '/create_dek_for_thread', {});
  t.is(refused.status, 400);
  t.is(refused.json.error.code, 'INVALID_INPUT');

  const lines = requests();
  t.deepEqual(
    lines.map((l) => [l.route, l.status, l.level]),
    [
      ['/healthz', 200, DEBUG],
      ['/metrics', 200, DEBUG],
      ['/healthz', 503, INFO],
      ['/create_dek_for_thread', 400, INFO],
    ],
  );
  t.like(lines[3], { method: 'POST', reqId: refused.headers['x-request-id'] });
});

test('access_log: false in the daemon config file logs no request lines', async (t) => {
  const file = path.join(tempDir(t), 'kms.yaml');
  writeFileSync(file, 'endpoint: 127.0.0.1:0\ndata_dir: unused-by-the-stub\naccess_log: false\n');
  const config = loadDaemonConfig({ config: file });
  t.false(config.accessLog);
  const { logger, lines, requests } = capture();
  const daemon = await startDaemon(config, logger, async () => probeKms({ ready: true }));
  t.teardown(() => daemon.close());
  const base = `http://127.0.0.1:${daemon.http.port}`;
  t.is((await request(base, '/healthz')).status, 200);
  t.is((await postJson(base, '/create_dek_for_thread', {})).status, 400);
  t.true(
    lines.some((l) => l.msg?.includes('listening')),
    'the logger is the one the daemon writes to',
  );
  t.deepEqual(requests(), []);
});

test('access_log: false in the server config file logs no request lines', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'progressdb.yaml');
  writeFileSync(
    file,
    [
      'addr: 127.0.0.1:0',
      `data_dir: ${JSON.stringify(path.join(dir, 'data'))}`,
      'use_encryption: false',
      'admin_key: admin-key-of-the-test-0123456789',
      'access_log: false',
      '',
    ].join('\n'),
  );
  const config = loadConfig({ configFile: file, env: {} });
  t.false(config.accessLog);
  const { logger, lines, requests } = capture();
  const server = await startServer(config, logger);
  t.teardown(() => server.close());
  t.is((await fetch(`${server.url}/healthz`)).status, 200);
  const created = await fetch(`${server.url}/v1/threads`, { method: 'POST' });
  t.is(created.status, 201);
  t.true(
    lines.some((l) => l.msg === 'progressdb listening'),
    'the logger is the one the server writes to',
  );
  t.deepEqual(requests(), []);
});
