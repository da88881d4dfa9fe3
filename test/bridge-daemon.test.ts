/**
 * The TCP bridge of the real daemon at the frame level: pipelining with answers matched by id,
 * the same error codes as HTTP, and the refusals that close only the offending connection
 * (oversized, malformed, truncated frames) or only fail one request (unknown op, batch too big).
 */
import test from 'ava';
import type { DekInfo, EncryptResult, ItemResult } from '../src/api/index.js';
import {
  decodeError,
  decodeResult,
  encodeRequest,
  FRAME_ERROR,
  FRAME_RESULT,
  FrameWriter,
} from '../src/wire/bridge-codec.js';
import { BridgeSocket, type Daemon, request, spawnDaemon } from './helpers/kms-daemon.js';

let daemon: Daemon;
let keyId: string;

test.before(async () => {
  daemon = await spawnDaemon({
    bridgePort: 0,
    args: ['--max-frame-bytes', '65536', '--max-batch-items', '50'],
  });
  const conn = new BridgeSocket(daemon.bridgePort!);
  conn.write(encodeRequest(1, { op: 'create_dek_for_thread', threadId: 'bridge-thread' }));
  const answer = await conn.answer(1);
  keyId = (decodeResult('create_dek_for_thread', answer.body) as DekInfo).keyId;
  conn.end();
});

test.after.always(async () => {
  await daemon?.kill9();
});

function open(t: { teardown(fn: () => void): void }): BridgeSocket {
  const conn = new BridgeSocket(daemon.bridgePort!);
  t.teardown(() => conn.destroy());
  return conn;
}

const errorOf = (f: { type: number; body: Buffer }) => (f.type === FRAME_ERROR ? decodeError(f.body) : null);

test('many pipelined requests in one write are all answered, matched by id', async (t) => {
  const conn = open(t);
  const n = 300;
  const frames = Array.from({ length: n }, (_, i) =>
    encodeRequest(100 + i, {
      op: 'encrypt',
      items: [{ keyId, plaintext: Buffer.from(`message ${i}`), aad: Buffer.from(`m${i}`) }],
    }),
  );
  conn.write(Buffer.concat(frames));
  await conn.waitFrames(n);
  const ids = new Set(conn.frames.map((f) => f.id));
  t.is(ids.size, n);
  const decrypts = conn.frames.map((f) => {
    t.is(f.type, FRAME_RESULT);
    const [r] = decodeResult('encrypt', f.body) as ItemResult<EncryptResult>[];
    t.true(r!.ok);
    return encodeRequest(10_000 + f.id, {
      op: 'decrypt',
      items: [
        {
          keyId,
          ciphertext: (r as { value: EncryptResult }).value.ciphertext,
          aad: Buffer.from(`m${f.id - 100}`),
        },
      ],
    });
  });
  conn.write(Buffer.concat(decrypts));
  await conn.waitFrames(2 * n);
  for (const f of conn.frames.slice(n)) {
    const [r] = decodeResult('decrypt', f.body) as ItemResult<Buffer>[];
    t.is((r as { value: Buffer }).value.toString(), `message ${f.id - 10_100}`);
  }
});

test('errors carry the same codes as HTTP: per request and per batch item', async (t) => {
  const conn = open(t);
  conn.write(encodeRequest(1, { op: 'get_wrapped', keyId: 'dek_missing' }));
  conn.write(
    encodeRequest(2, {
      op: 'decrypt',
      items: [
        { keyId, ciphertext: Buffer.from('garbage ciphertext bytes here...'), aad: undefined },
        { keyId: 'dek_missing', ciphertext: Buffer.from('x'), aad: undefined },
      ],
    }),
  );
  conn.write(encodeRequest(3, { op: 'health' }));
  const missing = errorOf(await conn.answer(1));
  t.is(missing?.code, 'KEY_NOT_FOUND');
  const batch = decodeResult('decrypt', (await conn.answer(2)).body) as ItemResult<Buffer>[];
  t.false(batch[0]!.ok);
  t.false(batch[1]!.ok);
  t.is((batch[1] as { error: { code: string } }).error.code, 'KEY_NOT_FOUND');
  const health = decodeResult('health', (await conn.answer(3)).body) as { ok: boolean };
  t.true(health.ok);
});

test('an unknown op code and an oversized batch fail that request only', async (t) => {
  const conn = open(t);
  conn.write(new FrameWriter(7, 0x7e).finish());
  const items = Array.from({ length: 51 }, () => ({ keyId, plaintext: Buffer.from('x'), aad: undefined }));
  conn.write(encodeRequest(8, { op: 'encrypt', items }));
  conn.write(encodeRequest(9, { op: 'rotation_status' }));
  t.is(errorOf(await conn.answer(7))?.code, 'UNSUPPORTED_OPERATION');
  t.is(errorOf(await conn.answer(8))?.code, 'PAYLOAD_TOO_LARGE');
  t.is((await conn.answer(9)).type, FRAME_RESULT);
});

test('an oversized frame gets PAYLOAD_TOO_LARGE and closes that connection only', async (t) => {
  const bystander = open(t);
  const conn = open(t);
  const header = Buffer.alloc(9);
  header.writeUInt32BE(65_537, 0);
  header.writeUInt32BE(5, 4);
  header[8] = 0x03;
  conn.write(header);
  await conn.closed;
  t.is(errorOf(conn.frames[0]!)?.code, 'PAYLOAD_TOO_LARGE');
  t.is(conn.frames[0]!.id, 0);
  bystander.write(encodeRequest(1, { op: 'rotation_status' }));
  t.is((await bystander.answer(1)).type, FRAME_RESULT);
});

test('a malformed body gets MALFORMED_FRAME for its id, then the connection closes', async (t) => {
  const conn = open(t);
  const good = encodeRequest(3, { op: 'get_wrapped', keyId });
  const withTrailing = Buffer.concat([good, Buffer.from([1, 2, 3])]);
  withTrailing.writeUInt32BE(withTrailing.length - 4, 0);
  conn.write(withTrailing);
  await conn.closed;
  t.is(conn.frames.length, 1);
  t.is(conn.frames[0]!.id, 3);
  t.is(errorOf(conn.frames[0]!)?.code, 'MALFORMED_FRAME');
});

test('a frame cut short by the client gets MALFORMED_FRAME, then close', async (t) => {
  const conn = open(t);
  const frame = encodeRequest(4, { op: 'create_dek_for_thread', threadId: 'cut-short' });
  conn.write(frame.subarray(0, frame.length - 3));
  conn.end();
  await conn.closed;
  t.is(errorOf(conn.frames[0]!)?.code, 'MALFORMED_FRAME');
});

test('a client that half-closes still gets its pipelined answers', async (t) => {
  const conn = open(t);
  conn.write(Buffer.concat([1, 2, 3].map((id) => encodeRequest(id, { op: 'get_wrapped', keyId }))));
  conn.end();
  await conn.closed;
  t.deepEqual(conn.frames.map((f) => [f.id, f.type]).sort(), [
    [1, FRAME_RESULT],
    [2, FRAME_RESULT],
    [3, FRAME_RESULT],
  ]);
});

test('bridge traffic shows in /metrics with transport="bridge"', async (t) => {
  const conn = open(t);
  conn.write(encodeRequest(1, { op: 'get_wrapped', keyId }));
  await conn.answer(1);
  const metrics = await request(`http://${daemon.http}`, '/metrics');
  t.regex(
    metrics.text,
    /progressdb_kms_requests_total\{op="get_wrapped",transport="bridge",outcome="ok"\} \d+/,
  );
  t.regex(metrics.text, /progressdb_kms_bridge_connections \d+/);
});
