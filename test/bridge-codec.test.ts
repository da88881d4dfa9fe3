/**
 * The bridge frame codec and the wire helpers it shares with the HTTP API: round trips of every
 * operation and result, streaming decode across arbitrary chunk boundaries, and the refusals
 * (oversized, short, truncated, trailing bytes, strict base64, endpoints).
 */
import { randomBytes } from 'node:crypto';
import test from 'ava';
import type { DekInfo, KmsHealth, RotationStatus } from '../src/api/index.js';
import { CodedError, kmsError } from '../src/errors.js';
import { MAX_AAD_BYTES, MAX_CIPHERTEXT_BYTES, MAX_ID_LENGTH } from '../src/kms/validate-args.js';
import { plaintextJson, plaintextToWire } from '../src/ops/decrypt.js';
import type { KmsRequest } from '../src/ops/index.js';
import { encryptResultJson, encryptResultToWire } from '../src/ops/shapes.js';
import { decodeBase64Field, isStrictBase64 } from '../src/wire/base64.js';
import {
  decodeAuth,
  decodeError,
  decodeRequest,
  decodeResult,
  encodeAuth,
  encodeError,
  encodeRequest,
  encodeResult,
  FRAME_ERROR,
  FRAME_LENGTH_BYTES,
  FRAME_RESULT,
  type Frame,
  FrameDecoder,
  MAX_OP_FRAME_BYTES,
  type OP_CODES,
  opOfCode,
} from '../src/wire/bridge-codec.js';
import { CLIENT_SCHEMES, isLoopbackHost, parseEndpoint } from '../src/wire/endpoint.js';
import { MAX_OP_BODY_BYTES } from '../src/wire/http-json.js';

const dek: DekInfo = {
  keyId: 'dek_1',
  threadId: 'thread-ü',
  kekId: 'kek_1',
  kekVersion: 3,
  keyVersion: 2,
  wrapped: Buffer.from([1, 2, 3, 255]),
  createdAt: '2026-01-01T00:00:00.000Z',
};
const rotation: RotationStatus = {
  state: 'running',
  kekId: 'kek_1',
  activeKekVersion: 3,
  targetKekVersion: 4,
  done: 10,
  total: 20_000,
  startedAt: '2026-01-01T00:00:00.000Z',
  finishedAt: null,
  kekVersions: [3, 4],
};

const requests: KmsRequest[] = [
  { op: 'create_dek_for_thread', threadId: 't1' },
  { op: 'get_wrapped', keyId: 'k' },
  {
    op: 'encrypt',
    items: [
      { keyId: 'k', plaintext: Buffer.from('hello'), aad: Buffer.from('a') },
      { keyId: 'k2', plaintext: Buffer.alloc(0), aad: undefined },
    ],
  },
  { op: 'decrypt', items: [{ keyId: 'k', ciphertext: Buffer.from([9, 9]), aad: Buffer.alloc(0) }] },
  { op: 'reencrypt', keyId: 'k', ciphertext: Buffer.from([1]), aad: undefined },
  { op: 'rewrap', keyId: 'k' },
  { op: 'rotate_dek', keyId: 'k' },
  { op: 'destroy_dek_versions_before', keyId: 'k', keepFromVersion: 7 },
  { op: 'destroy_dek', keyId: 'k' },
  { op: 'rotate_kek' },
  { op: 'rotation_status' },
  { op: 'health' },
];

function decodeAll(bytes: Buffer, chunkSizes: number[], max = 1 << 20): Frame[] {
  const decoder = new FrameDecoder(max);
  const frames: Frame[] = [];
  let pos = 0;
  let i = 0;
  while (pos < bytes.length) {
    const n = chunkSizes[i++ % chunkSizes.length]!;
    decoder.push(bytes.subarray(pos, pos + n), (f) => frames.push(f));
    pos += n;
  }
  return frames;
}

test('every request survives encode → decode, whatever the chunking', (t) => {
  const stream = Buffer.concat(requests.map((r, i) => encodeRequest(i + 1, r)));
  for (const sizes of [[stream.length], [1], [3, 7], [13, 1, 64]]) {
    const frames = decodeAll(stream, sizes);
    t.is(frames.length, requests.length);
    frames.forEach((f, i) => {
      t.is(f.id, i + 1);
      const op = opOfCode(f.type)!;
      t.deepEqual(decodeRequest(op, f.body), requests[i]);
    });
  }
});

test('every result survives encode → decode', (t) => {
  const health: KmsHealth = {
    ok: true,
    mode: 'external',
    kekId: 'kek_1',
    activeKekVersion: 3,
    dekCount: 5,
    poolThreads: 2,
    queueDepth: 0,
    rotation,
  };
  const cases: [keyof typeof OP_CODES, unknown][] = [
    ['create_dek_for_thread', dek],
    ['get_wrapped', dek],
    ['rewrap', dek],
    ['rotate_dek', dek],
    [
      'encrypt',
      [
        { ok: true, value: { ciphertext: Buffer.from('ct'), keyVersion: 2 } },
        { ok: false, error: kmsError('KEY_NOT_FOUND', 'no key k') },
      ],
    ],
    ['decrypt', [{ ok: true, value: Buffer.from('pt') }]],
    ['reencrypt', { ciphertext: Buffer.from('ct2'), keyVersion: 3 }],
    ['destroy_dek', { keyId: 'k', destroyedVersions: [1, 2], deletionDueAt: null }],
    ['destroy_dek', { keyId: 'k', destroyedVersions: [], deletionDueAt: '2026-12-10T08:00:00.000Z' }],
    ['destroy_dek_versions_before', { keyId: 'k', destroyedVersions: [], deletionDueAt: null }],
    ['rotate_kek', rotation],
    ['rotation_status', { ...rotation, state: 'idle', targetKekVersion: null, startedAt: null }],
    ['health', health],
  ];
  for (const [op, value] of cases) {
    const [frame] = decodeAll(encodeResult(42, op, value), [5]);
    t.is(frame!.type, FRAME_RESULT);
    const back = decodeResult(op, frame!.body);
    if (op === 'encrypt') {
      const [ok, bad] = back as { ok: boolean; value?: unknown; error?: CodedError }[];
      t.deepEqual(ok, (value as unknown[])[0]);
      t.true(bad!.error instanceof CodedError);
      t.is(bad!.error!.code, 'KEY_NOT_FOUND');
      t.is(bad!.error!.status, 404);
    } else {
      t.deepEqual(back, value, op);
    }
  }
});

test('auth and error frames round-trip; errors are rebuilt with their catalogue status', (t) => {
  const [auth] = decodeAll(encodeAuth(1, 'secret-token-ü'), [100]);
  t.is(decodeAuth(auth!.body), 'secret-token-ü');
  const [err] = decodeAll(encodeError(0, 'DECRYPT_FAILED', 'nope'), [100]);
  t.is(err!.type, FRAME_ERROR);
  const e = decodeError(err!.body);
  t.is(e.code, 'DECRYPT_FAILED');
  t.is(e.status, 422);
  t.is(e.message, 'nope');
});

test('the decoder refuses an oversized length before buffering the body', (t) => {
  const decoder = new FrameDecoder(1024);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(1025);
  const err = t.throws(() => decoder.push(header, () => t.fail()));
  t.is((err as CodedError).code, 'PAYLOAD_TOO_LARGE');
});

test('a length shorter than the header is malformed', (t) => {
  const decoder = new FrameDecoder(1024);
  const err = t.throws(() => decoder.push(Buffer.from([0, 0, 0, 2, 0, 0]), () => t.fail()));
  t.is((err as CodedError).code, 'MALFORMED_FRAME');
});

test('a partial frame is reported as mid-frame until it completes', (t) => {
  const frame = encodeRequest(5, { op: 'get_wrapped', keyId: 'abc' });
  const decoder = new FrameDecoder(1024);
  const got: Frame[] = [];
  decoder.push(frame.subarray(0, 2), (f) => got.push(f));
  t.true(decoder.midFrame);
  decoder.push(frame.subarray(2, 10), (f) => got.push(f));
  t.true(decoder.midFrame);
  decoder.push(frame.subarray(10), (f) => got.push(f));
  t.false(decoder.midFrame);
  t.is(got.length, 1);
});

test('bodies with missing or trailing bytes, or forged counts, are malformed', (t) => {
  const good = encodeRequest(1, { op: 'get_wrapped', keyId: 'abc' });
  const [frame] = decodeAll(good, [good.length]);
  const code = (fn: () => unknown) => (t.throws(fn) as CodedError).code;
  t.is(
    code(() => decodeRequest('get_wrapped', frame!.body.subarray(0, frame!.body.length - 1))),
    'MALFORMED_FRAME',
  );
  t.is(
    code(() => decodeRequest('get_wrapped', Buffer.concat([frame!.body, Buffer.from([0])]))),
    'MALFORMED_FRAME',
  );
  const forged = Buffer.alloc(4);
  forged.writeUInt32BE(0xfffffff0);
  t.is(
    code(() => decodeRequest('encrypt', forged)),
    'MALFORMED_FRAME',
  );
  t.is(
    code(() => decodeResult('health', Buffer.alloc(3))),
    'MALFORMED_FRAME',
  );
});

test('strict base64: padding, alphabet and canonical tail bits', (t) => {
  const good = ['', 'QQ==', 'QUI=', 'QUJD', 'aGVsbG8=', '+/+/'];
  const bad = [
    'Q',
    'QQ',
    'QQ=',
    'QR==',
    'QUJ=',
    'QU=I',
    '-_-_',
    'QUJD\n',
    ' QUJD',
    'QQ==QQ==',
    '====',
    'QUJD====',
  ];
  // The regex and the fast decode-and-compare path must agree on every case.
  for (const ok of good) {
    t.true(isStrictBase64(ok), ok);
    t.notThrows(() => decodeBase64Field(ok, 'f'), ok);
  }
  for (const b of bad) {
    t.false(isStrictBase64(b), b);
    t.throws(() => decodeBase64Field(b, 'f'), undefined, b);
  }
  const agrees = (s: string) => {
    let fast = true;
    try {
      decodeBase64Field(s, 'f');
    } catch {
      fast = false;
    }
    return fast === isStrictBase64(s);
  };
  for (let n = 0; n < 300; n++) {
    const random = randomBytes(n % 7).toString('base64');
    const mangled = random.replace(/.$/, (c) => (c === '=' ? 'A' : '='));
    t.true(agrees(random) && agrees(mangled), random);
  }
  t.deepEqual(decodeBase64Field('aGVsbG8=', 'x'), Buffer.from('hello'));
  const err = t.throws(() => decodeBase64Field('a$==', 'plaintext')) as CodedError;
  t.is(err.code, 'MALFORMED_BASE64');
  t.regex(err.message, /plaintext/);
});

test('endpoints: forms, defaults and loopback detection', (t) => {
  t.deepEqual(parseEndpoint('127.0.0.1:6820'), { scheme: undefined, host: '127.0.0.1', port: 6820 });
  t.deepEqual(parseEndpoint('https://kms.internal:443'), {
    scheme: 'https',
    host: 'kms.internal',
    port: 443,
  });
  t.deepEqual(parseEndpoint('tcp://[::1]:7000'), { scheme: 'tcp', host: '::1', port: 7000 });
  t.deepEqual(parseEndpoint('localhost'), { scheme: undefined, host: 'localhost', port: 6820 });
  // tls:// is for clients (the TLS bridge as the daemon announces it), not for listeners.
  t.deepEqual(parseEndpoint('tls://127.0.0.1:6821', 6820, CLIENT_SCHEMES), {
    scheme: 'tls',
    host: '127.0.0.1',
    port: 6821,
  });
  t.is((t.throws(() => parseEndpoint('tls://127.0.0.1:6821')) as CodedError).code, 'CONFIG_INVALID');
  for (const bad of ['ftp://x:1', 'x:99999', ':80', 'a b:1', '[zz]:1']) {
    t.is((t.throws(() => parseEndpoint(bad)) as CodedError).code, 'CONFIG_INVALID', bad);
  }
  t.true(isLoopbackHost('127.0.0.1'));
  t.true(isLoopbackHost('127.8.0.1'));
  t.true(isLoopbackHost('::1'));
  t.true(isLoopbackHost('localhost'));
  t.false(isLoopbackHost('0.0.0.0'));
  t.false(isLoopbackHost('::'));
  t.false(isLoopbackHost('10.0.0.1'));
  t.false(isLoopbackHost('kms.example.com'));
});

test('HTTP JSON fast paths give exactly what JSON.stringify gives for the result objects', (t) => {
  for (const n of [0, 1, 2, 3, 64, 1024, 4099]) {
    const bytes = randomBytes(n);
    for (const keyVersion of [1, 7, 4294967295]) {
      const r = { ciphertext: bytes, keyVersion };
      t.is(encryptResultJson(r), JSON.stringify(encryptResultToWire(r)));
    }
    t.is(plaintextJson(bytes), JSON.stringify(plaintextToWire(bytes)));
    t.deepEqual(JSON.parse(plaintextJson(bytes)), { plaintext: bytes.toString('base64') });
  }
});

test('the default frame and body limits hold one call on the largest input the KMS takes', (t) => {
  const ciphertext = Buffer.alloc(MAX_CIPHERTEXT_BYTES, 0xab);
  const aad = Buffer.alloc(MAX_AAD_BYTES, 0xcd);
  // The longest id in UTF-8 (3 bytes per unit) for the frame, in JSON escapes (6) for the body.
  const frame = encodeRequest(1, {
    op: 'decrypt',
    items: [{ keyId: '€'.repeat(MAX_ID_LENGTH), ciphertext, aad }],
  });
  t.is(frame.length - FRAME_LENGTH_BYTES, MAX_OP_FRAME_BYTES);
  const body = JSON.stringify({
    batch_input: [
      {
        key_id: '\ud800'.repeat(MAX_ID_LENGTH),
        ciphertext: ciphertext.toString('base64'),
        aad: aad.toString('base64'),
      },
    ],
  });
  t.true(Buffer.byteLength(body) <= MAX_OP_BODY_BYTES);
  t.true(Buffer.byteLength(body) > MAX_OP_BODY_BYTES - 1024);
});
