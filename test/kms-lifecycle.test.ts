/**
 * Embedded KMS life cycle: master key sources and failures, the data directory lock, the audit
 * file at start-up, close() and health().
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { BroadcastChannel } from 'node:worker_threads';
import test from 'ava';
import { ServiceError } from '../src/errors.js';
import { createKms } from '../src/kms/index.js';
import {
  auditPath,
  expectCode,
  openKms,
  randomKeyHex,
  startChild,
  tempDir,
  writeMasterKey,
  writeScript,
} from './helpers/kms.js';
import { until } from './helpers/processes.js';

function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

test('master key file missing or malformed: MASTER_KEY_MISSING / MASTER_KEY_INVALID', async (t) => {
  const dir = tempDir(t);
  const dataDir = path.join(dir, 'kms');
  const err = await expectCode(
    t,
    createKms({ dataDir, masterKeyFile: path.join(dir, 'absent.key'), poolSize: 1 }),
    'MASTER_KEY_MISSING',
  );
  t.true(err instanceof ServiceError);
  const malformed: Record<string, string> = {
    '63 hex characters': 'a'.repeat(63),
    '65 hex characters': 'a'.repeat(65),
    'non-hex': `${'a'.repeat(62)}zz`,
    empty: '',
    'hex with a space inside': `${'a'.repeat(32)} ${'a'.repeat(32)}`,
  };
  for (const [what, content] of Object.entries(malformed)) {
    const file = path.join(dir, `bad-${what.replaceAll(' ', '-')}.key`);
    fs.writeFileSync(file, content, { mode: 0o600 });
    const e = await expectCode(
      t,
      createKms({ dataDir, masterKeyFile: file, poolSize: 1 }),
      'MASTER_KEY_INVALID',
      what,
    );
    t.false(
      e?.message.includes(content.slice(0, 16)) && content.length > 0,
      'the message does not quote the key',
    );
  }
  // Failed starts released the data dir: a good key opens it.
  const { file } = writeMasterKey(dir);
  const kms = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
  t.teardown(() => kms.close());
  t.true((await kms.health()).ok);
});

test('a wrong master key is MASTER_KEY_MISMATCH and leaves the data dir untouched', async (t) => {
  const fixture = await openKms(t);
  const dek = await fixture.kms.createDekForThread('thread-mk');
  const aad = Buffer.from('aad');
  const { ciphertext } = await fixture.kms.encrypt(dek.keyId, Buffer.from('old message'), aad);
  await fixture.kms.close();
  const registryFile = path.join(fixture.dataDir, 'registry.mdb');
  const before = { registry: sha256(registryFile), audit: sha256(auditPath(fixture.dataDir)) };

  const wrong = writeMasterKey(fixture.dir, randomKeyHex(), 'wrong.key');
  const err = await expectCode(
    t,
    createKms({ dataDir: fixture.dataDir, masterKeyFile: wrong.file, poolSize: 1 }),
    'MASTER_KEY_MISMATCH',
  );
  t.regex(err?.message ?? '', /does not match/);
  t.false(err?.message.includes(wrong.hex));
  // Uppercase hex of the right key is the same key, so it is not a mismatch: checked below.
  t.is(sha256(registryFile), before.registry, 'registry unchanged');
  t.is(sha256(auditPath(fixture.dataDir)), before.audit, 'audit log unchanged');

  const upper = writeMasterKey(fixture.dir, fixture.keyHex.toUpperCase(), 'upper.key');
  const kms = await fixture.reopen({ masterKeyFile: upper.file });
  t.deepEqual(await kms.decrypt(dek.keyId, ciphertext, aad), Buffer.from('old message'));
  t.true((await kms.verifyAudit()).ok);
  t.is((await kms.createDekForThread('thread-mk')).keyId, dek.keyId);
});

test('master key from an environment variable name; more than one source is CONFIG_INVALID', async (t) => {
  const dir = tempDir(t);
  const dataDir = path.join(dir, 'kms');
  const hex = randomKeyHex();
  const name = `PDB_TEST_MASTER_KEY_${randomBytes(6).toString('hex')}`;
  process.env[name] = hex;
  t.teardown(() => {
    delete process.env[name];
  });
  const kms = await createKms({ dataDir, masterKeyEnv: name, poolSize: 1 });
  const dek = await kms.createDekForThread('thread-env');
  const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from('via env'));
  await kms.close();

  // The same key given as a file opens the same data dir.
  const { file } = writeMasterKey(dir, hex);
  const viaFile = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
  t.deepEqual(await viaFile.decrypt(dek.keyId, ciphertext), Buffer.from('via env'));
  await viaFile.close();

  await expectCode(
    t,
    createKms({ dataDir, masterKeyFile: file, masterKeyEnv: name, poolSize: 1 }),
    'CONFIG_INVALID',
  );
  await expectCode(
    t,
    createKms({ dataDir, masterKeyEnv: name, masterKeyConfigFile: path.join(dir, 'c.yaml'), poolSize: 1 }),
    'CONFIG_INVALID',
  );
  const unset = `PDB_TEST_UNSET_${randomBytes(6).toString('hex')}`;
  await expectCode(t, createKms({ dataDir, masterKeyEnv: unset, poolSize: 1 }), 'MASTER_KEY_MISSING');
  process.env[name] = hex.slice(1);
  await expectCode(t, createKms({ dataDir, masterKeyEnv: name, poolSize: 1 }), 'MASTER_KEY_INVALID');
});

test('audit log not writable at start-up: AUDIT_UNWRITABLE, and the data dir is released', async (t) => {
  const dir = tempDir(t);
  const { file } = writeMasterKey(dir);
  // Tests run as root, so file modes would not stop the write: use paths that cannot be opened
  // for appending whoever you are.
  const asDirectory = path.join(dir, 'dir-case');
  fs.mkdirSync(path.join(asDirectory, 'kms-audit.log'), { recursive: true });
  const e1 = await expectCode(
    t,
    createKms({ dataDir: asDirectory, masterKeyFile: file, poolSize: 1 }),
    'AUDIT_UNWRITABLE',
  );
  t.regex(e1?.message ?? '', /kms-audit\.log/);

  const dangling = path.join(dir, 'symlink-case');
  fs.mkdirSync(dangling);
  fs.symlinkSync(path.join(dir, 'no-such-dir', 'audit.log'), path.join(dangling, 'kms-audit.log'));
  await expectCode(t, createKms({ dataDir: dangling, masterKeyFile: file, poolSize: 1 }), 'AUDIT_UNWRITABLE');

  // Fix the path: the lock was released, so the same data dir opens.
  fs.rmSync(path.join(asDirectory, 'kms-audit.log'), { recursive: true });
  const kms = await createKms({ dataDir: asDirectory, masterKeyFile: file, poolSize: 1 });
  t.teardown(() => kms.close());
  t.true((await kms.health()).ok);
  t.true(fs.statSync(auditPath(asDirectory)).isFile());
  t.is(fs.statSync(auditPath(asDirectory)).mode & 0o777, 0o600);
});

test('data dir lock: same process and another live process get DATA_DIR_LOCKED; a dead owner is taken over', async (t) => {
  const fixture = await openKms(t);
  await expectCode(
    t,
    createKms({ dataDir: fixture.dataDir, masterKeyFile: fixture.keyFile, poolSize: 1 }),
    'DATA_DIR_LOCKED',
  );
  t.true((await fixture.kms.health()).ok, 'the first KMS is unaffected');
  await fixture.kms.close();

  // Another process holds the data dir.
  const script = writeScript(
    fixture.dir,
    'hold',
    `import { createKms } from 'KMS_MODULE';
const kms = await createKms({ dataDir: process.argv[2], masterKeyFile: process.argv[3], poolSize: 1 });
await kms.createDekForThread('held');
process.stdout.write('ready\\n');
setInterval(() => {}, 1000);
`,
  );
  const child = startChild(t, script, [fixture.dataDir, fixture.keyFile]);
  await until(
    'the child to open the KMS',
    () => (child.stdout().includes('ready') ? true : undefined),
    20_000,
  );
  const lockFile = path.join(fixture.dataDir, 'kms.lock');
  t.is(fs.readFileSync(lockFile, 'utf8').trim(), String(child.pid), 'the holder names itself, for operators');
  const locked = await expectCode(
    t,
    createKms({ dataDir: fixture.dataDir, masterKeyFile: fixture.keyFile, poolSize: 1 }),
    'DATA_DIR_LOCKED',
  );
  t.true(locked?.message.includes(String(child.pid)));

  // kill -9: the kernel drops the flock with the process; the file stays and blocks nothing.
  child.kill('SIGKILL');
  const exit = await child.exited;
  t.is(exit.signal, 'SIGKILL');
  t.true(fs.existsSync(lockFile));
  const kms = await fixture.reopen();
  t.is(fs.readFileSync(lockFile, 'utf8').trim(), String(process.pid));
  t.truthy((await kms.createDekForThread('held')).keyId);
  await kms.close();
  t.is(
    fs.readFileSync(lockFile, 'utf8'),
    '',
    'close unlocks and clears the pid (the file is never unlinked)',
  );

  // The pid in the file is never trusted: our own pid (PID 1 in a container after a restart), a
  // live unrelated pid, or garbage left by a crash do not block a start.
  for (const content of [`${process.pid}\n`, '1\n', `${process.ppid}\n`, 'garbage\n']) {
    fs.writeFileSync(lockFile, content);
    const again = await fixture.reopen();
    t.true((await again.health()).ok, `lock file holding ${JSON.stringify(content)}`);
    await again.close();
  }
});

test('close(): later calls reject with NOT_READY, closing twice is fine, workers zero their keys', async (t) => {
  const fixture = await openKms(t, { poolSize: 2 });
  const { kms } = fixture;
  const dek = await kms.createDekForThread('thread-close');
  const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from('x'));

  // Learn the pool's broadcast channel from the eviction that destroyDek announces, then listen
  // on it for the workers' acknowledgements of the zeroize sent by close().
  const victim = await kms.createDekForThread('thread-victim');
  const original = BroadcastChannel.prototype.postMessage;
  let channelName: string | undefined;
  BroadcastChannel.prototype.postMessage = function (this: BroadcastChannel, message: unknown) {
    if ((message as { keyId?: string } | null)?.keyId === victim.keyId) channelName = this.name;
    return original.call(this, message);
  };
  try {
    await kms.destroyDek(victim.keyId);
  } finally {
    BroadcastChannel.prototype.postMessage = original;
  }
  t.truthy(channelName);
  const listener = new BroadcastChannel(channelName!);
  const zeroed = new Set<number>();
  listener.onmessage = (event) => {
    const data = (event as MessageEvent).data as { type?: string; threadId?: number } | null;
    if (data?.type === 'zeroized' && typeof data.threadId === 'number') zeroed.add(data.threadId);
  };
  t.teardown(() => listener.close());

  await Promise.all([kms.close(), kms.close()]);
  await kms.close();
  await until(
    'both workers to confirm zeroing their keys',
    () => (zeroed.size >= 2 ? true : undefined),
    5000,
  );
  t.is(zeroed.size, 2, 'each of the two workers, not one twice');

  const calls: Record<string, () => Promise<unknown>> = {
    encrypt: () => kms.encrypt(dek.keyId, Buffer.from('x')),
    decrypt: () => kms.decrypt(dek.keyId, ciphertext),
    reencrypt: () => kms.reencrypt(dek.keyId, ciphertext),
    'createDekForThread (existing)': () => kms.createDekForThread('thread-close'),
    'createDekForThread (new)': () => kms.createDekForThread('thread-new'),
    getWrappedDek: () => kms.getWrappedDek(dek.keyId),
    rewrapDek: () => kms.rewrapDek(dek.keyId),
    rotateDek: () => kms.rotateDek(dek.keyId),
    destroyDekVersionsBefore: () => kms.destroyDekVersionsBefore(dek.keyId, 1),
    destroyDek: () => kms.destroyDek(dek.keyId),
    rotateKek: () => kms.rotateKek(),
    startKekRotation: () => kms.startKekRotation(),
    rotationStatus: () => kms.rotationStatus(),
    health: () => kms.health(),
    verifyAudit: () => kms.verifyAudit(),
  };
  for (const [name, call] of Object.entries(calls)) await expectCode(t, call(), 'NOT_READY', name);
  const [item] = await kms.encryptBatch([{ keyId: dek.keyId, plaintext: Buffer.from('x') }]);
  t.like(item, { ok: false, error: { code: 'NOT_READY' } });

  // The data survived: a new KMS on the directory still has the key.
  const reopened = await fixture.reopen();
  t.deepEqual(await reopened.decrypt(dek.keyId, ciphertext), Buffer.from('x'));
  await expectCode(t, reopened.encrypt(victim.keyId, Buffer.from('x')), 'KEY_NOT_FOUND');
});

test('health() reports the pool, keys, KEK and rotation', async (t) => {
  const { kms } = await openKms(t, { poolSize: 2 });
  const fresh = await kms.health();
  t.like(fresh, {
    ok: true,
    mode: 'embedded',
    activeKekVersion: 1,
    dekCount: 0,
    poolThreads: 2,
    queueDepth: 0,
  });
  t.regex(fresh.kekId, /^kek_[0-9a-f]+$/);
  t.like(fresh.rotation, { state: 'idle', activeKekVersion: 1, kekId: fresh.kekId, kekVersions: [1] });
  for (let i = 0; i < 5; i++) await kms.createDekForThread(`thread-${i}`);
  await kms.createDekForThread('thread-0');
  const dek = await kms.createDekForThread('thread-gone');
  await kms.destroyDek(dek.keyId);
  const after = await kms.health();
  t.is(after.dekCount, 5);
  await kms.rotateKek();
  const rotated = await kms.health();
  t.like(rotated, { ok: true, activeKekVersion: 2, kekId: fresh.kekId, queueDepth: 0 });
  t.like(rotated.rotation, {
    state: 'completed',
    activeKekVersion: 2,
    targetKekVersion: 2,
    kekVersions: [2],
  });
  t.is(rotated.rotation.done, rotated.rotation.total);
});
