/**
 * The daemon's listeners against callers that never authenticate, hold sockets, flood one
 * address or rely on a network allow-list (issue 14 items 4, 5, 6 and 9). Every daemon here is
 * the real executable on loopback; 127.0.0.2 and 127.0.0.3 are other loopback addresses.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import path from 'node:path';
import test from 'ava';
import {
  decodeError,
  decodeResult,
  encodeAuth,
  encodeRequest,
  FRAME_ERROR,
} from '../src/wire/bridge-codec.js';
import {
  BridgeSocket,
  type Daemon,
  daemonRefuses,
  keygen,
  makePki,
  postJson,
  spawnDaemon,
} from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';
import { tempDir } from './helpers/server.js';

const TOKEN = 'listener-token-0123456789abcdef';

let guarded: Daemon;
let open: Daemon;

test.before(async () => {
  const dir = tempDir('pdb-kms-listeners-');
  await keygen(dir);
  writeFileSync(
    path.join(dir, 'kms.yaml'),
    [
      'tokens:',
      '  - name: app',
      `    token: ${TOKEN}`,
      'allowed_networks: [127.0.0.2/32]',
      'limits: { auth_timeout_ms: 400, idle_timeout_ms: 800 }',
    ].join('\n'),
  );
  const openDir = tempDir('pdb-kms-listeners-open-');
  await keygen(openDir);
  writeFileSync(path.join(openDir, 'kms.yaml'), 'limits: { max_connections_per_address: 2 }\n');
  [guarded, open] = await Promise.all([
    spawnDaemon({ dir, bridgePort: 0, args: ['--config', path.join(dir, 'kms.yaml')] }),
    spawnDaemon({ dir: openDir, bridgePort: 0, args: ['--config', path.join(openDir, 'kms.yaml')] }),
  ]);
});

test.after.always(async () => {
  await Promise.all([guarded?.kill9(), open?.kill9()]);
});

/** The 9-byte header of a frame that claims `length` bytes after its length field. */
function frameHeader(id: number, type: number, length: number): Buffer {
  const b = Buffer.alloc(9);
  b.writeUInt32BE(length, 0);
  b.writeUInt32BE(id, 4);
  b[8] = type;
  return b;
}

test('before AUTH a large frame is refused from its length prefix, before its body is sent', async (t) => {
  const conn = new BridgeSocket(guarded.bridgePort!);
  t.teardown(() => conn.destroy());
  // Only the header of a 1 MiB encrypt frame is written: the answer cannot wait for the body.
  conn.write(frameHeader(7, 0x03, 1024 * 1024));
  const [frame] = await conn.waitFrames(1);
  t.is(frame?.type, FRAME_ERROR);
  t.is(decodeError(frame!.body).code, 'PAYLOAD_TOO_LARGE');
  await until('the connection to close', () => (conn.isClosed ? true : undefined));
});

test('a bridge connection that never sends AUTH is closed at the AUTH deadline', async (t) => {
  const conn = new BridgeSocket(guarded.bridgePort!);
  t.teardown(() => conn.destroy());
  await until('the silent connection to be closed', () => (conn.isClosed ? true : undefined), 10_000);
  const error = conn.frames.find((f) => f.type === FRAME_ERROR);
  t.is(error && decodeError(error.body).code, 'UNAUTHENTICATED');
});

test('an HTTP socket that never sends a byte is closed by the idle timeout', async (t) => {
  const socket = connect({ host: '127.0.0.1', port: guarded.httpPort });
  t.teardown(() => socket.destroy());
  let closed = false;
  socket.on('error', () => {});
  socket.on('close', () => (closed = true));
  await until('the silent HTTP socket to be closed', () => (closed ? true : undefined), 10_000);
  t.true(closed);
});

test('a caller in allowed_networks needs no token and is audited by its network and address', async (t) => {
  const allowed = await postJson(
    `http://${guarded.http}`,
    '/create_dek_for_thread',
    { thread_id: 'allow-listed' },
    { localAddress: '127.0.0.2' },
  );
  t.is(allowed.status, 200, JSON.stringify(allowed.json));
  const outside = await postJson(`http://${guarded.http}`, '/create_dek_for_thread', {
    thread_id: 'outside',
  });
  t.is(outside.status, 401);
  t.is((outside.json as { error: { code: string } }).error.code, 'UNAUTHENTICATED');

  // The bridge: the same rule, without an AUTH frame.
  const inside = new BridgeSocket(guarded.bridgePort!, '127.0.0.2');
  t.teardown(() => inside.destroy());
  inside.write(encodeRequest(1, { op: 'health' }));
  t.true((decodeResult('health', (await inside.answer(1)).body) as { ok: boolean }).ok);

  const line = readFileSync(path.join(guarded.dataDir, 'kms-audit.log'), 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as Record<string, string>)
    .find((l) => l.op === 'create_dek_for_thread' && l.thread_id === 'allow-listed');
  t.is(line?.caller, 'network:127.0.0.2/32');
  t.is(line?.remote, '127.0.0.2');
});

test('a token still works from outside the allowed networks; a wrong one is refused inside them', async (t) => {
  const conn = new BridgeSocket(guarded.bridgePort!);
  t.teardown(() => conn.destroy());
  conn.write(encodeAuth(1, TOKEN));
  conn.write(encodeRequest(2, { op: 'health' }));
  t.true((decodeResult('health', (await conn.answer(2)).body) as { ok: boolean }).ok);

  const wrong = await postJson(
    `http://${guarded.http}`,
    '/create_dek_for_thread',
    { thread_id: 'wrong-token' },
    { localAddress: '127.0.0.2', headers: { authorization: 'Bearer not-the-token-0123456789' } },
  );
  t.is(wrong.status, 403);
});

test('more connections from one address than max_connections_per_address are refused', async (t) => {
  const healthy = async (conn: BridgeSocket, id: number) => {
    conn.write(encodeRequest(id, { op: 'health' }));
    return (decodeResult('health', (await conn.answer(id)).body) as { ok: boolean }).ok;
  };
  const first = new BridgeSocket(open.bridgePort!, '127.0.0.3');
  const second = new BridgeSocket(open.bridgePort!, '127.0.0.3');
  t.teardown(() => first.destroy());
  t.teardown(() => second.destroy());
  t.true(await healthy(first, 1));
  t.true(await healthy(second, 1));
  const third = new BridgeSocket(open.bridgePort!, '127.0.0.3');
  t.teardown(() => third.destroy());
  await until('the third connection to be refused', () => (third.isClosed ? true : undefined));
  t.false(first.isClosed || second.isClosed, 'the two within the limit are kept');

  // Another address is not affected, and a slot freed is a slot available again.
  const elsewhere = new BridgeSocket(open.bridgePort!, '127.0.0.4');
  t.teardown(() => elsewhere.destroy());
  t.true(await healthy(elsewhere, 1));
  first.destroy();
  await first.closed;
  const fourth = await until('a connection from 127.0.0.3 to be accepted again', async () => {
    const conn = new BridgeSocket(open.bridgePort!, '127.0.0.3');
    try {
      conn.write(encodeRequest(1, { op: 'health' }));
      await until('an answer or a close', () => (conn.frames.length > 0 || conn.isClosed ? true : undefined));
      if (conn.frames.length > 0) return conn;
    } catch {
      // refused: try again once the daemon has seen the close
    }
    conn.destroy();
    return undefined;
  });
  t.teardown(() => fourth.destroy());
  t.false(fourth.isClosed);
});

test('TLS alone does not open a non-loopback listener; an allow-list or --insecure does', async (t) => {
  const dir = tempDir('pdb-kms-tls-only-');
  const key = await keygen(dir);
  const pki = makePki();
  const common = [
    '--data-dir',
    path.join(dir, 'kms'),
    '--master-key-file',
    key,
    '--tls-cert',
    pki.files.serverCert,
    '--tls-key',
    pki.files.serverKey,
  ];
  const refused = await daemonRefuses(['--listen', '0.0.0.0:0', ...common]);
  t.is(refused.code, 1);
  t.regex(refused.stderr, /refusing to listen on non-loopback/);

  const allowList = await spawnDaemon({
    dir,
    args: ['--listen', '0.0.0.0:0', ...common.slice(4)],
    env: { PROGRESSDB_KMS_ALLOWED_NETWORKS: '127.0.0.0/8' },
  });
  t.teardown(() => allowList.kill9());
  t.true(allowList.listeners().length > 0);
});

test('an allowed_networks entry that is not address/prefix fails start-up with CONFIG_INVALID', async (t) => {
  const dir = tempDir('pdb-kms-bad-net-');
  const key = await keygen(dir);
  const res = await daemonRefuses(['--data-dir', path.join(dir, 'kms'), '--master-key-file', key], {
    PROGRESSDB_KMS_ALLOWED_NETWORKS: '10.0.0.0/33',
  });
  t.is(res.code, 1);
  t.regex(res.stderr, /10\.0\.0\.0\/33/);
});
