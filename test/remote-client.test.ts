/**
 * createRemoteKms against the real daemon, over HTTP and over the TCP bridge: the whole Kms
 * interface behaves as embedded does (same results, same error codes), batches larger than one
 * request are split, and while the daemon is down every call fails promptly with
 * KMS_UNAVAILABLE, then works again with the same client once the daemon is back.
 */

import { randomFillSync } from 'node:crypto';
import http from 'node:http';
import test, { type ExecutionContext } from 'ava';
import type { Kms } from '../src/api/index.js';
import { DEFAULT_MAX_BODY_BYTES } from '../src/config/daemon.js';
import type { CodedError } from '../src/errors.js';
import { MAX_AAD_BYTES, MAX_CIPHERTEXT_BYTES, MAX_PLAINTEXT_BYTES } from '../src/kms/validate-args.js';
import { createRemoteKms } from '../src/remote/index.js';
import { DEFAULT_MAX_FRAME_BYTES, decodeError } from '../src/wire/bridge-codec.js';
import { expectCode, openKms, sealAndOpen, sealedMessages } from './helpers/kms.js';
import { BridgeSocket, type Daemon, makePki, spawnDaemon } from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';

const transports = [
  ['http', (d: Daemon) => `http://${d.http}`],
  ['tcp', (d: Daemon) => `tcp://${d.bridge}`],
] as const;

let daemon: Daemon;

test.before(async () => {
  daemon = await spawnDaemon({ bridgePort: 0 });
});

test.after.always(async () => {
  await daemon?.kill9();
});

for (const [name, endpointOf] of transports) {
  test(`${name}: the whole Kms interface`, async (t) => {
    const kms = createRemoteKms({ endpoint: endpointOf(daemon) });
    t.teardown(() => kms.close());
    const dek = await kms.createDekForThread(`remote-${name}`);
    t.deepEqual(await kms.createDekForThread(`remote-${name}`), dek);
    t.is((await kms.getWrappedDek(dek.keyId)).keyId, dek.keyId);
    t.true(Buffer.isBuffer(dek.wrapped));

    const aad = Buffer.from('thread/message');
    const enc = await kms.encrypt(dek.keyId, Buffer.from('body'), aad);
    t.is(enc.keyVersion, 1);
    t.is((await kms.decrypt(dek.keyId, enc.ciphertext, aad)).toString(), 'body');
    const wrongAad = await t.throwsAsync<CodedError>(
      kms.decrypt(dek.keyId, enc.ciphertext, Buffer.from('x')),
    );
    t.is(wrongAad?.code, 'DECRYPT_FAILED');
    t.is(wrongAad?.status, 422);
    t.is((await t.throwsAsync<CodedError>(kms.getWrappedDek('dek_nope')))?.code, 'KEY_NOT_FOUND');

    const batch = await kms.encryptBatch([
      { keyId: dek.keyId, plaintext: Buffer.from('a') },
      { keyId: 'dek_nope', plaintext: Buffer.from('b') },
    ]);
    t.true(batch[0]!.ok);
    t.false(batch[1]!.ok);
    t.is(!batch[1]!.ok && batch[1]!.error.code, 'KEY_NOT_FOUND');
    t.deepEqual(await kms.encryptBatch([]), []);

    const rotated = await kms.rotateDek(dek.keyId);
    t.is(rotated.keyVersion, 2);
    const re = await kms.reencrypt(dek.keyId, enc.ciphertext, aad);
    t.is(re.keyVersion, 2);
    t.deepEqual((await kms.destroyDekVersionsBefore(dek.keyId, 2)).destroyedVersions, [1]);
    t.is((await kms.decrypt(dek.keyId, re.ciphertext, aad)).toString(), 'body');

    const before = await kms.rotationStatus();
    const status = await kms.rotateKek();
    t.is(status.state, 'completed');
    // The other transport's test may be rotating too: joining its rotation is correct.
    t.true(status.activeKekVersion > before.activeKekVersion || before.state === 'running');
    t.true(status.activeKekVersion >= before.activeKekVersion);
    t.is((await kms.rewrapDek(dek.keyId)).kekVersion, status.activeKekVersion);
    const health = await kms.health();
    t.true(health.ok);
    t.is(health.mode, 'external');
    t.deepEqual((await kms.destroyDek(dek.keyId)).destroyedVersions, [2]);
    t.is(
      (await t.throwsAsync<CodedError>(kms.decrypt(dek.keyId, re.ciphertext, aad)))?.code,
      'KEY_NOT_FOUND',
    );
  });

  test(`${name}: batches larger than one request are split and answered in order`, async (t) => {
    const kms = createRemoteKms({ endpoint: endpointOf(daemon) });
    t.teardown(() => kms.close());
    const dek = await kms.createDekForThread(`remote-split-${name}`);
    const items = Array.from({ length: 2500 }, (_, i) => ({
      keyId: dek.keyId,
      plaintext: Buffer.from(`m${i}`),
    }));
    const encrypted = await kms.encryptBatch(items);
    t.is(encrypted.length, items.length);
    const decrypted = await kms.decryptBatch(
      encrypted.map((r) => ({ keyId: dek.keyId, ciphertext: r.ok ? r.value.ciphertext : Buffer.alloc(0) })),
    );
    t.true(decrypted.every((r, i) => r.ok && r.value.toString() === `m${i}`));
    // Many concurrent single calls share connections (HTTP keep-alive, one pipelined socket).
    const singles = await Promise.all(items.slice(0, 500).map((it) => kms.encrypt(it.keyId, it.plaintext)));
    t.is(singles.length, 500);
  });
}

test('tcp: concurrent single calls share requests, each caller gets its own result or error', async (t) => {
  const kms = createRemoteKms({ endpoint: `tcp://${daemon.bridge}` });
  t.teardown(() => kms.close());
  const dek = await kms.createDekForThread('remote-coalesce');
  // Made in one tick: coalesced into batch requests; a bad key fails only its own call.
  const calls = Array.from({ length: 600 }, (_, i) =>
    i % 7 === 3
      ? kms.encrypt('no-such-key', Buffer.from(`m${i}`))
      : kms.encrypt(dek.keyId, Buffer.from(`m${i}`), Buffer.from(`aad${i}`)),
  );
  const settled = await Promise.allSettled(calls);
  const decrypts: Promise<Buffer>[] = [];
  settled.forEach((r, i) => {
    if (i % 7 === 3) {
      t.is(r.status, 'rejected');
      if (r.status === 'rejected') t.is((r.reason as CodedError).code, 'KEY_NOT_FOUND');
    } else if (r.status === 'fulfilled') {
      decrypts.push(kms.decrypt(dek.keyId, r.value.ciphertext, Buffer.from(`aad${i}`)));
    } else t.fail(`call ${i} failed: ${String(r.reason)}`);
  });
  const plain = await Promise.all(decrypts);
  const expected = settled.flatMap((_, i) => (i % 7 === 3 ? [] : [`m${i}`]));
  t.deepEqual(
    plain.map((p) => p.toString()),
    expected,
  );
  // A wrong AAD fails that decrypt alone, even when it shares a request with good ones.
  const good = settled.find((r) => r.status === 'fulfilled')!;
  const ct = (good as PromiseFulfilledResult<{ ciphertext: Buffer }>).value.ciphertext;
  const [ok, bad] = await Promise.allSettled([
    kms.decrypt(dek.keyId, ct, Buffer.from('aad0')),
    kms.decrypt(dek.keyId, ct, Buffer.from('wrong')),
  ]);
  t.is(ok.status, 'fulfilled');
  t.is(bad.status, 'rejected');
});

test('tcp: against a daemon whose batch limit is below the coalesced size, single calls still work', async (t) => {
  const own = await spawnDaemon({ bridgePort: 0, args: ['--max-batch-items', '2'] });
  t.teardown(() => own.kill9());
  const kms = createRemoteKms({ endpoint: `tcp://${own.bridge}`, retries: 0 });
  t.teardown(() => kms.close());
  const dek = await kms.createDekForThread('remote-coalesce-limit');
  t.deepEqual(await sealAndOpen(kms, dek.keyId, 20, 'x'), sealedMessages(20, 'x'));
  // Explicit batches over the daemon's limit are still refused as a whole.
  const err = await t.throwsAsync<CodedError>(
    kms.encryptBatch([1, 2, 3].map((n) => ({ keyId: dek.keyId, plaintext: Buffer.from([n]) }))),
  );
  t.is(err?.code, 'PAYLOAD_TOO_LARGE');
});

test.serial(
  'while the daemon is down every call fails fast with KMS_UNAVAILABLE; then it recovers',
  async (t) => {
    const own = await spawnDaemon({ bridgePort: 0 });
    t.teardown(() => own.kill9());
    const clients: [string, Kms][] = transports.map(([name, endpointOf]) => [
      name,
      createRemoteKms({ endpoint: endpointOf(own), timeoutMs: 5000 }),
    ]);
    t.teardown(() => Promise.all(clients.map(([, k]) => k.close())));
    const keys = new Map<string, { keyId: string; ciphertext: Buffer }>();
    for (const [name, kms] of clients) {
      const dek = await kms.createDekForThread(`outage-${name}`);
      keys.set(name, {
        keyId: dek.keyId,
        ciphertext: (await kms.encrypt(dek.keyId, Buffer.from(name))).ciphertext,
      });
    }

    await own.kill9();
    for (const [name, kms] of clients) {
      const { keyId, ciphertext } = keys.get(name)!;
      const calls: [string, () => Promise<unknown>][] = [
        ['decrypt (idempotent)', () => kms.decrypt(keyId, ciphertext)],
        ['encrypt', () => kms.encrypt(keyId, Buffer.from('x'))],
        ['rotateDek (not idempotent)', () => kms.rotateDek(keyId)],
        ['health', () => kms.health()],
      ];
      for (const [what, call] of calls) {
        const started = Date.now();
        const err = await t.throwsAsync<CodedError>(call());
        t.is(err?.code, 'KMS_UNAVAILABLE', `${name} ${what}`);
        t.is(err?.status, 503);
        t.true(Date.now() - started < 2000, `${name} ${what} failed promptly`);
      }
    }

    const back = await spawnDaemon({
      dir: own.dir,
      httpPort: own.httpPort,
      bridgePort: own.bridgePort!,
    });
    t.teardown(() => back.kill9());
    for (const [name, kms] of clients) {
      const { keyId, ciphertext } = keys.get(name)!;
      const plaintext = await until(`${name} client recovers`, () =>
        kms.decrypt(keyId, ciphertext).then(
          (p) => p,
          () => undefined,
        ),
      );
      t.is(plaintext.toString(), name);
    }
  },
);

test.serial('a daemon that stops answering makes calls time out instead of hanging', async (t) => {
  const own = await spawnDaemon({ bridgePort: 0 });
  t.teardown(async () => {
    own.child.kill('SIGCONT');
    await own.kill9();
  });
  for (const [name, endpointOf] of transports) {
    const kms = createRemoteKms({ endpoint: endpointOf(own), timeoutMs: 300, retries: 0 });
    t.teardown(() => kms.close());
    const dek = await kms.createDekForThread(`stall-${name}`);
    own.child.kill('SIGSTOP');
    const err = await t.throwsAsync<CodedError>(kms.getWrappedDek(dek.keyId));
    t.is(err?.code, 'TIMEOUT', name);
    own.child.kill('SIGCONT');
    t.is((await kms.getWrappedDek(dek.keyId)).keyId, dek.keyId);
  }
});

test('bad client options are refused at creation', (t) => {
  for (const opts of [
    { endpoint: 'ftp://x:1' },
    { endpoint: '127.0.0.1:0' },
    { endpoint: 'tcp://127.0.0.1:1', transport: 'http' as const },
    { endpoint: 'tls://127.0.0.1:1', transport: 'http' as const },
    { endpoint: '127.0.0.1:1', retries: -1 },
    { endpoint: '127.0.0.1:1', timeoutMs: 0 },
  ]) {
    t.is((t.throws(() => createRemoteKms(opts)) as CodedError).code, 'CONFIG_INVALID', JSON.stringify(opts));
  }
});

/** A bad argument's outcome: the error code and status, or per item for batches. */
type Outcome = string | string[];

async function outcomeOf(call: () => Promise<unknown>): Promise<Outcome> {
  try {
    const value = await call();
    if (Array.isArray(value)) {
      return value.map((r: { ok: boolean; error?: CodedError }) =>
        r.ok ? 'ok' : `${r.error!.code} ${r.error!.status}`,
      );
    }
    return 'ok';
  } catch (err) {
    const e = err as CodedError;
    return `${e.code} ${e.status}`;
  }
}

/** An embedded KMS and a client of the daemon per transport (no retries), closed at teardown. */
async function everyClient(t: ExecutionContext): Promise<[string, Kms][]> {
  const { kms: embedded } = await openKms(t);
  const clients: [string, Kms][] = [['embedded', embedded]];
  for (const [name, endpointOf] of transports) {
    const kms = createRemoteKms({ endpoint: endpointOf(daemon), retries: 0 });
    t.teardown(() => kms.close());
    clients.push([name, kms]);
  }
  return clients;
}

test('a bad argument gets the same code and status embedded, over HTTP and over the bridge', async (t) => {
  const clients = await everyClient(t);
  const pt = Buffer.from('plain');
  const bigPlaintext = Buffer.alloc(MAX_PLAINTEXT_BYTES + 1);
  const bigCiphertext = Buffer.alloc(MAX_CIPHERTEXT_BYTES + 1);
  const bigAad = Buffer.alloc(MAX_AAD_BYTES + 1);
  // biome-ignore lint/suspicious/noExplicitAny: wrong types are what is tested
  const any = (v: unknown) => v as any;
  const badIds = ['', 'k'.repeat(3000), 'a\nb', 'x\u007f', any(undefined), any(42)];
  type Case = [string, string, (kms: Kms, keyId: string, ct: Buffer) => Promise<unknown>];
  const cases: Case[] = [];
  const INVALID = 'INVALID_INPUT 400';
  const TOO_LARGE = 'PAYLOAD_TOO_LARGE 413';
  for (const [i, id] of badIds.entries()) {
    cases.push(
      [`createDekForThread id ${i}`, INVALID, (kms) => kms.createDekForThread(id)],
      [`getWrappedDek id ${i}`, INVALID, (kms) => kms.getWrappedDek(id)],
      [`rewrapDek id ${i}`, INVALID, (kms) => kms.rewrapDek(id)],
      [`rotateDek id ${i}`, INVALID, (kms) => kms.rotateDek(id)],
      [`destroyDek id ${i}`, INVALID, (kms) => kms.destroyDek(id)],
      [`destroyDekVersionsBefore id ${i}`, INVALID, (kms) => kms.destroyDekVersionsBefore(id, 1)],
      [`encrypt id ${i}`, INVALID, (kms) => kms.encrypt(id, pt)],
      [`decrypt id ${i}`, INVALID, (kms, _k, ct) => kms.decrypt(id, ct)],
      [`reencrypt id ${i}`, INVALID, (kms, _k, ct) => kms.reencrypt(id, ct)],
    );
  }
  cases.push(
    ['destroyDekVersionsBefore version 0', INVALID, (kms, k) => kms.destroyDekVersionsBefore(k, 0)],
    ['destroyDekVersionsBefore version 1.5', INVALID, (kms, k) => kms.destroyDekVersionsBefore(k, 1.5)],
    ['encrypt string plaintext', INVALID, (kms, k) => kms.encrypt(k, any('text'))],
    ['encrypt no plaintext', INVALID, (kms, k) => kms.encrypt(k, any(undefined))],
    ['encrypt string aad', INVALID, (kms, k) => kms.encrypt(k, pt, any('aad'))],
    ['encrypt oversized plaintext', TOO_LARGE, (kms, k) => kms.encrypt(k, bigPlaintext)],
    ['encrypt oversized aad', TOO_LARGE, (kms, k) => kms.encrypt(k, pt, bigAad)],
    ['decrypt array ciphertext', INVALID, (kms, k) => kms.decrypt(k, any([1, 2, 3]))],
    ['decrypt string aad', INVALID, (kms, k, ct) => kms.decrypt(k, ct, any('aad'))],
    ['decrypt oversized ciphertext', TOO_LARGE, (kms, k) => kms.decrypt(k, bigCiphertext)],
    ['decrypt oversized aad', TOO_LARGE, (kms, k, ct) => kms.decrypt(k, ct, bigAad)],
    ['reencrypt string ciphertext', INVALID, (kms, k) => kms.reencrypt(k, any('ct'))],
    ['reencrypt oversized ciphertext', TOO_LARGE, (kms, k) => kms.reencrypt(k, bigCiphertext)],
    ['reencrypt oversized aad', TOO_LARGE, (kms, k, ct) => kms.reencrypt(k, ct, bigAad)],
    ['encryptBatch not an array', INVALID, (kms) => kms.encryptBatch(any('items'))],
    ['decryptBatch not an array', INVALID, (kms) => kms.decryptBatch(any({}))],
  );
  // In a batch each bad item gets its own error and the good ones still run.
  const batchCases: [string, (kms: Kms, keyId: string, ct: Buffer) => Promise<unknown>][] = [
    [
      'encryptBatch items',
      (kms, k) =>
        kms.encryptBatch([
          { keyId: k, plaintext: pt },
          { keyId: '', plaintext: pt },
          any(null),
          { keyId: k, plaintext: any('text') },
          { keyId: k, plaintext: pt, aad: bigAad },
          { keyId: k, plaintext: pt, aad: any(null) },
        ]),
    ],
    [
      'decryptBatch items',
      (kms, k, ct) =>
        kms.decryptBatch([
          { keyId: 'k'.repeat(3000), ciphertext: ct },
          { keyId: k, ciphertext: ct },
          { keyId: k, ciphertext: bigCiphertext },
          { keyId: k, ciphertext: ct, aad: any(7) },
        ]),
    ],
  ];
  const expectedBatch: Record<string, Outcome> = {
    'encryptBatch items': ['ok', INVALID, INVALID, INVALID, TOO_LARGE, 'ok'],
    'decryptBatch items': [INVALID, 'ok', TOO_LARGE, INVALID],
  };
  const fixtures = await Promise.all(
    clients.map(async ([name, kms]) => {
      const dek = await kms.createDekForThread(`bad-args-${name}`);
      return { name, kms, keyId: dek.keyId, ct: (await kms.encrypt(dek.keyId, pt)).ciphertext };
    }),
  );
  for (const [what, expected, call] of cases) {
    for (const f of fixtures) {
      t.is(await outcomeOf(() => call(f.kms, f.keyId, f.ct)), expected, `${f.name}: ${what}`);
    }
  }
  for (const [what, call] of batchCases) {
    for (const f of fixtures) {
      t.deepEqual(
        await outcomeOf(() => call(f.kms, f.keyId, f.ct)),
        expectedBatch[what],
        `${f.name}: ${what}`,
      );
    }
  }
  // The keys are still usable: nothing bad reached the daemon's state.
  for (const f of fixtures) t.is((await f.kms.decrypt(f.keyId, f.ct)).toString(), 'plain', f.name);
});

test('the tls:// endpoint a daemon announces for its TLS bridge is the bridge over TLS', async (t) => {
  const pki = makePki();
  const tlsArgs = ['--tls-cert', pki.files.serverCert, '--tls-key', pki.files.serverKey];
  const [plainTls, mutual] = await Promise.all([
    spawnDaemon({ bridgePort: 0, args: tlsArgs }),
    spawnDaemon({ bridgePort: 0, args: [...tlsArgs, '--tls-ca', pki.files.caCert] }),
  ]);
  t.teardown(() => Promise.all([plainTls.kill9(), mutual.kill9()]));
  const announced = (d: Daemon) => {
    const line = d.listeners().find((l) => l.listener === 'bridge') as { msg?: string } | undefined;
    return /(tls:\/\/\S+)/.exec(line?.msg ?? '')?.[1] ?? '';
  };
  t.is(announced(plainTls), `tls://${plainTls.bridge}`);

  const client = { ca: pki.caCert, cert: pki.clientCert, key: pki.clientKey };
  for (const [d, tls] of [
    [plainTls, { ca: pki.caCert }],
    [mutual, client],
  ] as const) {
    const kms = createRemoteKms({ endpoint: announced(d), tls, retries: 0 });
    t.teardown(() => kms.close());
    const dek = await kms.createDekForThread('over-tls-bridge');
    const enc = await kms.encrypt(dek.keyId, Buffer.from('secret'), Buffer.from('aad'));
    t.is((await kms.decrypt(dek.keyId, enc.ciphertext, Buffer.from('aad'))).toString(), 'secret');
    t.is((await kms.health()).mode, 'external');
  }
  // tls:// means TLS even without options: the daemon's private CA is not in the system store.
  const untrusted = createRemoteKms({ endpoint: announced(plainTls), retries: 0, timeoutMs: 3000 });
  t.teardown(() => untrusted.close());
  t.is((await t.throwsAsync<CodedError>(untrusted.health()))?.code, 'KMS_UNAVAILABLE');
  // A mutual-TLS bridge still wants our certificate.
  const noCert = createRemoteKms({ endpoint: announced(mutual), tls: { ca: pki.caCert }, retries: 0 });
  t.teardown(() => noCert.close());
  t.is((await t.throwsAsync<CodedError>(noCert.health()))?.code, 'UNAUTHENTICATED');
});

// The largest input itself (64 MiB) takes ~25 s here; that it fits the default limits exactly is
// checked without a daemon in bridge-codec.test.ts.
test.serial('with default limits 1 MiB and 8 MiB plaintexts round-trip over both transports', async (t) => {
  const aad = randomFillSync(Buffer.alloc(MAX_AAD_BYTES));
  for (const size of [1024 * 1024, 8 * 1024 * 1024]) {
    const plaintext = randomFillSync(Buffer.alloc(size));
    for (const [name, endpointOf] of transports) {
      const kms = createRemoteKms({ endpoint: endpointOf(daemon), retries: 0, timeoutMs: 60_000 });
      t.teardown(() => kms.close());
      const dek = await kms.createDekForThread(`large-${name}`);
      const enc = await kms.encrypt(dek.keyId, plaintext, aad);
      t.true((await kms.decrypt(dek.keyId, enc.ciphertext, aad)).equals(plaintext), `${name} ${size}`);
      const [batched] = await kms.decryptBatch([{ keyId: dek.keyId, ciphertext: enc.ciphertext, aad }]);
      t.true(batched!.ok && batched!.value.equals(plaintext), `${name} ${size} batch`);
    }
  }
});

test('a body or frame over the default limit is still refused with PAYLOAD_TOO_LARGE', async (t) => {
  // Declared length only: the daemon answers before reading any of the body.
  const reply = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1',
      port: daemon.httpPort,
      method: 'POST',
      path: '/encrypt',
      headers: { 'content-type': 'application/json', 'content-length': String(DEFAULT_MAX_BODY_BYTES + 1) },
    });
    req.on('response', (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.flushHeaders();
  });
  t.is(reply.status, 413);
  t.is(JSON.parse(reply.body).error.code, 'PAYLOAD_TOO_LARGE');

  const conn = new BridgeSocket(daemon.bridgePort!);
  t.teardown(() => conn.destroy());
  const header = Buffer.alloc(9);
  header.writeUInt32BE(DEFAULT_MAX_FRAME_BYTES + 1, 0);
  header.writeUInt32BE(1, 4);
  header[8] = 0x03;
  conn.write(header);
  await conn.closed;
  t.is(decodeError(conn.frames[0]!.body).code, 'PAYLOAD_TOO_LARGE');
});

test('a keep_from_version beyond 32 bits is refused, never wrapped to a small version on the bridge', async (t) => {
  const clients = await everyClient(t);
  for (const [name, kms] of clients) {
    const dek = await kms.createDekForThread(`wrap-${name}`);
    const old = await kms.encrypt(dek.keyId, Buffer.from('version 1'));
    await kms.rotateDek(dek.keyId);
    // 2^32 + 2 as a u32 is 2: it would destroy version 1.
    await expectCode(t, kms.destroyDekVersionsBefore(dek.keyId, 2 ** 32 + 2), 'INVALID_INPUT', name);
    t.is((await kms.decrypt(dek.keyId, old.ciphertext)).toString(), 'version 1', `${name}: version 1 kept`);
  }
});
