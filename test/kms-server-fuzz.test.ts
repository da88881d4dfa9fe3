/**
 * 1,000 random malformed HTTP requests and 1,000 random malformed bridge frames against the real
 * daemon: none may be answered with a 5xx (or a server_error outcome on the bridge), the daemon
 * must stay healthy, and every key stored before the barrage must still decrypt.
 * The generator is seeded; the seed is printed so a failure can be replayed.
 */
import http from 'node:http';
import test, { type ExecutionContext } from 'ava';
import type { DekInfo, EncryptResult, ItemResult } from '../src/api/index.js';
import {
  decodeResult,
  encodeRequest,
  FRAME_ERROR,
  FRAME_RESULT,
  OP_CODES,
} from '../src/wire/bridge-codec.js';
import { BridgeSocket, b64, type Daemon, postJson, request, spawnDaemon } from './helpers/kms-daemon.js';

const SEED = Number(process.env.FUZZ_SEED ?? Date.now() % 2 ** 31);

/** mulberry32: small, seedable, good enough to pick mutations. */
function rng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
  return { next, int, pick, bytes };
}

let daemon: Daemon;
let base: string;
const stored: { keyId: string; ciphertext: string; aad: string; plaintext: string }[] = [];

test.before(async () => {
  daemon = await spawnDaemon({
    bridgePort: 0,
    args: ['--max-body-bytes', '65536', '--max-frame-bytes', '65536'],
  });
  base = `http://${daemon.http}`;
  for (let i = 0; i < 20; i++) {
    const dek = await postJson(base, '/create_dek_for_thread', { thread_id: `fuzz-${i}` });
    const plaintext = b64(`stored message ${i}`);
    const aad = b64(`aad-${i}`);
    const enc = await postJson(base, '/encrypt', { key_id: dek.json.key_id, plaintext, aad });
    stored.push({ keyId: dek.json.key_id, ciphertext: enc.json.ciphertext, aad, plaintext });
  }
});

test.after.always(async () => {
  await daemon?.kill9();
});

const PATHS = [
  '/encrypt',
  '/decrypt',
  '/create_dek_for_thread',
  '/get_wrapped',
  '/reencrypt',
  '/rewrap',
  '/rotate_dek',
  '/destroy_dek_versions_before',
  '/rotate_kek',
  '/health',
  '/healthz',
  '/metrics',
  '/',
  '/encrypt/',
  '/%ZZ',
  '/encrypt?batch_input=1',
  '/get_wrapped?key_id=',
  '/get_wrapped?key_id=a&key_id=b',
  '/../etc/passwd',
  `/${'a'.repeat(2000)}`,
];
const TYPES = [
  'application/json',
  'application/json; charset=utf-8',
  'text/plain',
  '',
  'application/jsonx',
  'multipart/form-data',
];
const METHODS = ['GET', 'POST', 'POST', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'HEAD'];

function randomJson(r: ReturnType<typeof rng>, depth = 0): unknown {
  switch (r.int(depth > 3 ? 5 : 9)) {
    case 0:
      return null;
    case 1:
      return r.next() * 1e308 * (r.next() < 0.5 ? -1 : 1);
    case 2:
      return r.pick(['', 'QQ==', 'QR==', '!!!!', 'a'.repeat(r.int(300)), '\u0000', '\ud800', 'dek_x']);
    case 3:
      return r.next() < 0.5;
    case 4:
      return r.int(2 ** 31) - 2 ** 30;
    case 5:
      return Array.from({ length: r.int(5) }, () => randomJson(r, depth + 1));
    default: {
      const fields = [
        'key_id',
        'plaintext',
        'ciphertext',
        'aad',
        'thread_id',
        'keep_from_version',
        'batch_input',
        '__proto__',
        'constructor',
      ];
      const o: Record<string, unknown> = {};
      for (let i = r.int(5); i > 0; i--) o[r.pick(fields)] = randomJson(r, depth + 1);
      return o;
    }
  }
}

function randomBody(r: ReturnType<typeof rng>): string | Buffer {
  const valid = JSON.stringify({
    key_id: r.pick(stored).keyId,
    plaintext: b64('hello'),
    ciphertext: r.pick(stored).ciphertext,
    thread_id: 'fuzz-thread',
    aad: b64('x'),
    keep_from_version: '1',
  });
  switch (r.int(7)) {
    case 0:
      return valid.slice(0, r.int(valid.length));
    case 1: {
      const b = Buffer.from(valid);
      for (let i = 0; i < 3; i++) b[r.int(b.length)] = r.int(256);
      return b;
    }
    case 2:
      return r.bytes(r.int(200));
    case 3:
      return JSON.stringify({ batch_input: Array.from({ length: r.int(20) }, () => randomJson(r)) });
    case 4:
      return '['.repeat(5000) + ']'.repeat(5000);
    case 5:
      return JSON.stringify(randomJson(r));
    default:
      return valid.replace(/"[A-Za-z0-9+/=]{4,}"/g, () => `"${r.pick(['x', 'QQ', '====', 'Q Q=', 'ü'])}"`);
  }
}

async function pool<T>(items: T[], concurrency: number, run: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < items.length) await run(items[next++]!);
    }),
  );
}

async function everyStoredKeyDecrypts(t: ExecutionContext) {
  const res = await postJson(base, '/decrypt', {
    batch_input: stored.map((s) => ({ key_id: s.keyId, ciphertext: s.ciphertext, aad: s.aad })),
  });
  t.is(res.status, 200);
  const plaintexts = res.json.batch_results.map((item: { plaintext?: string }) => item.plaintext);
  t.deepEqual(
    plaintexts,
    stored.map((s) => s.plaintext),
  );
}

test.serial('1,000 random malformed HTTP requests: never a 5xx', async (t) => {
  t.log(`seed ${SEED}`);
  const r = rng(SEED);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
  t.teardown(() => agent.destroy());
  const statuses = new Map<number, number>();
  const requests = Array.from({ length: 1000 }, (_, i) => i);
  await pool(requests, 16, async () => {
    const method = r.pick(METHODS);
    const headers: Record<string, string> = {};
    const type = r.pick(TYPES);
    if (type) headers['content-type'] = type;
    if (r.next() < 0.1) headers.authorization = r.pick(['Bearer', 'Bearer x', 'Basic Og==', '\t']);
    const body = method === 'GET' || method === 'HEAD' ? undefined : randomBody(r);
    const status = await new Promise<number>((resolve, reject) => {
      const req = http.request(`${base}${r.pick(PATHS)}`, { method, headers, agent }, (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', reject);
      req.end(body);
    });
    statuses.set(status, (statuses.get(status) ?? 0) + 1);
  });
  t.log(`statuses: ${JSON.stringify(Object.fromEntries(statuses))}`);
  for (const status of statuses.keys()) t.true(status < 500, `status ${status}`);
  t.is((await request(base, '/healthz')).status, 200);
  await everyStoredKeyDecrypts(t);
});

test.serial(
  '1,000 random malformed bridge frames: no server error, other connections unaffected',
  async (t) => {
    const r = rng(SEED + 1);
    const bystander = new BridgeSocket(daemon.bridgePort!);
    t.teardown(() => bystander.destroy());
    const valid = () => {
      const s = r.pick(stored);
      const codes = Object.values(OP_CODES);
      const frame = encodeRequest(r.int(2 ** 32), {
        op: 'decrypt',
        items: [{ keyId: s.keyId, ciphertext: Buffer.from(s.ciphertext, 'base64'), aad: undefined }],
      });
      frame[8] = r.next() < 0.5 ? r.pick(codes) : r.int(256);
      return frame;
    };
    const mutations: (() => Buffer)[] = [
      () => r.bytes(r.int(64)),
      () => {
        const f = valid();
        for (let i = 0; i < 1 + r.int(4); i++) f[9 + r.int(f.length - 9)] = r.int(256);
        return f;
      },
      () => valid().subarray(0, 1 + r.int(30)),
      () => {
        const f = Buffer.from(valid());
        f.writeUInt32BE(r.pick([0, 1, 4, 5, 70_000, 0xffffffff, r.int(2 ** 32)]), 0);
        return f;
      },
      () => {
        const f = Buffer.concat([valid(), r.bytes(1 + r.int(8))]);
        f.writeUInt32BE(f.length - 4, 0);
        return f;
      },
      () => Buffer.concat([valid(), r.bytes(r.int(40))]),
    ];
    let answered = 0;
    await pool(
      Array.from({ length: 1000 }, (_, i) => i),
      16,
      async () => {
        const conn = new BridgeSocket(daemon.bridgePort!);
        conn.write(r.pick(mutations)());
        conn.end();
        await conn.closed;
        for (const f of conn.frames) {
          t.true(f.type === FRAME_RESULT || f.type === FRAME_ERROR);
          answered++;
        }
      },
    );
    t.log(`${answered} frames answered`);
    bystander.write(encodeRequest(1, { op: 'health' }));
    t.true((decodeResult('health', (await bystander.answer(1)).body) as { ok: boolean }).ok);
    const metrics = await request(base, '/metrics');
    t.notRegex(metrics.text, /outcome="server_error"\} [1-9]/);
    t.notRegex(metrics.text, /code="INTERNAL"/);
    await everyStoredKeyDecrypts(t);
    // The keys still work over the bridge too, and new keys can be made.
    const conn = new BridgeSocket(daemon.bridgePort!);
    t.teardown(() => conn.destroy());
    conn.write(encodeRequest(2, { op: 'create_dek_for_thread', threadId: 'after-fuzz' }));
    const dek = decodeResult('create_dek_for_thread', (await conn.answer(2)).body) as DekInfo;
    conn.write(
      encodeRequest(3, {
        op: 'encrypt',
        items: [{ keyId: dek.keyId, plaintext: Buffer.from('ok'), aad: undefined }],
      }),
    );
    const [enc] = decodeResult('encrypt', (await conn.answer(3)).body) as ItemResult<EncryptResult>[];
    t.true(enc!.ok);
  },
);
