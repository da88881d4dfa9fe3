/**
 * `progressdb-kms backup` and `restore`: the real CLI beside a live embedded KMS (the backup must
 * not need the data directory lock), then a KMS opened on the restored directory. A restore that
 * cannot prove the master key, or reads a damaged file, writes nothing.
 */
import fs from 'node:fs';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { Etcd3 } from 'etcd3';
import { createKms } from '../src/kms/index.js';
import { readBackup } from '../src/kms/registry/backup.js';
import type { DekRecord, KekRecord } from '../src/kms/registry/index.js';
import { EtcdCluster } from './helpers/etcd.js';
import { expectCode, openKms, tempDir, writeMasterKey } from './helpers/kms.js';
import { cleanEnv } from './helpers/processes.js';
import { KMS_CLI, runCli } from './helpers/server.js';

function cli(args: string[]) {
  return runCli(KMS_CLI, args, { env: cleanEnv(), timeoutMs: 60_000 });
}

function restoreCli(input: string, dataDir: string, keyFile: string) {
  return cli(['restore', '--in', input, '--data-dir', dataDir, '--master-key-file', keyFile]);
}

interface Sealed {
  threadId: string;
  keyId: string;
  ciphertext: Buffer;
}

async function seal(kms: Awaited<ReturnType<typeof createKms>>, threadId: string): Promise<Sealed> {
  const { keyId } = await kms.createDekForThread(threadId);
  const { ciphertext } = await kms.encrypt(keyId, Buffer.from(`body of ${threadId}`), Buffer.from(threadId));
  return { threadId, keyId, ciphertext };
}

async function opensAll(
  t: ExecutionContext,
  kms: Awaited<ReturnType<typeof createKms>>,
  sealed: Sealed[],
): Promise<void> {
  const opened = await Promise.all(
    sealed.map((s) => kms.decrypt(s.keyId, s.ciphertext, Buffer.from(s.threadId))),
  );
  t.deepEqual(
    opened.map((p) => p.toString()),
    sealed.map((s) => `body of ${s.threadId}`),
  );
}

/** Nothing of a KMS data directory in `dir` (absent, or without a registry or lock). */
function leftEmpty(t: ExecutionContext, dir: string): void {
  t.deepEqual(fs.existsSync(dir) ? fs.readdirSync(dir) : [], [], `${dir} was left empty`);
}

test('backup beside a live KMS, restore to a new directory: keys as of the backup, destroyed ones too', async (t) => {
  const fx = await openKms(t);
  const before = await Promise.all(Array.from({ length: 50 }, (_, i) => seal(fx.kms, `thread-${i}`)));
  // After a completed rotation KEK version 1 is gone: version 2 alone wraps every DEK.
  await fx.kms.rotateKek();
  before.push(await seal(fx.kms, 'thread-after-rotation'));
  const file = path.join(fx.dir, 'kms.backup');

  const made = await cli(['backup', '--data-dir', fx.dataDir, '--out', file]);
  t.is(made.code, 0, made.stderr);
  t.regex(made.stdout, /backed up .* KEK \S+ \(active version 2\), 1 KEK versions, 51 DEKs, 51 threads/);
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  const header = JSON.parse(fs.readFileSync(file, 'utf8').split('\n')[0] as string);
  t.like(header, { format: 'progressdb-kms-backup', version: 1, activeKekVersion: 2, kekVersions: [2] });
  t.deepEqual(header.counts, { keks: 1, deks: 51, threads: 51, pending: 0 });
  t.false(fs.readFileSync(file, 'utf8').includes(fx.keyHex), 'no master key in the backup');

  // The live KMS keeps going: a new key, and one that existed at the backup is destroyed.
  const after = await seal(fx.kms, 'thread-after-backup');
  const doomed = before[3] as Sealed;
  await fx.kms.destroyDek(doomed.keyId);
  await t.throwsAsync(fx.kms.decrypt(doomed.keyId, doomed.ciphertext, Buffer.from(doomed.threadId)));

  const restoredDir = path.join(tempDir(t, 'pdb-restore-'), 'kms');
  const restored = await restoreCli(file, restoredDir, fx.keyFile);
  t.is(restored.code, 0, restored.stderr);
  t.regex(restored.stdout, /restored .* 1 KEK versions, 51 DEKs, 51 threads/);

  const kms = await createKms({ dataDir: restoredDir, masterKeyFile: fx.keyFile, poolSize: 1 });
  t.teardown(() => kms.close());
  await opensAll(t, kms, before);
  await expectCode(
    t,
    kms.decrypt(after.keyId, after.ciphertext, Buffer.from(after.threadId)),
    'KEY_NOT_FOUND',
  );
  // The thread index came back too: the old thread gets its old key, the later one a new key.
  t.is((await kms.createDekForThread('thread-7')).keyId, (before[7] as Sealed).keyId);
  t.not((await kms.createDekForThread('thread-after-backup')).keyId, after.keyId);

  // A second restore into the same (now non-empty) directory is refused.
  const again = await restoreCli(file, restoredDir, fx.keyFile);
  t.is(again.code, 1);
  t.regex(again.stderr, /REGISTRY_NOT_EMPTY: .* already holds registry\.mdb/);
});

test('a backup taken during creates, destroys and a KEK rotation is one consistent moment', async (t) => {
  // Small rotation batches: the rotation commits many times while the backup reads.
  const fx = await openKms(t, { rotationBatchSize: 20 });
  for (let i = 0; i < 2000; i += 500) {
    await Promise.all(Array.from({ length: 500 }, (_, j) => fx.kms.createDekForThread(`busy-${i + j}`)));
  }
  const file = path.join(fx.dir, 'busy.backup');
  let stop = false;
  let writes = 0;
  const busy = (async () => {
    for (let i = 0; !stop; i++) {
      const { keyId } = await fx.kms.createDekForThread(`during-${i}`);
      if (i % 3 === 0) await fx.kms.rotateDek(keyId);
      if (i % 5 === 0) await fx.kms.destroyDek(keyId);
      writes++;
    }
  })();
  const rotation = fx.kms.rotateKek();
  const made = await cli(['backup', '--data-dir', fx.dataDir, '--out', file]);
  stop = true;
  await Promise.all([busy, rotation]);
  t.is(made.code, 0, made.stderr);
  t.true(writes > 0);

  // Each KEK version's reference count is the number of DEK versions wrapped under it, and each
  // thread names an active DEK: what a torn read across commits would break.
  const { entries, header } = readBackup(file);
  t.log(
    `writes during: ${writes}; backup: rotation ${header.rotation}, KEK versions ${header.kekVersions}, ${header.counts.deks} DEKs`,
  );
  const deks = new Map<string, DekRecord>();
  const refs = new Map<number, number>();
  for (const { key, value } of entries) {
    if (!key.startsWith('dek/')) continue;
    const dek = value as DekRecord;
    deks.set(dek.keyId, dek);
    for (const v of dek.versions) refs.set(v.kek, (refs.get(v.kek) ?? 0) + 1);
  }
  for (const { key, value } of entries) {
    if (key.startsWith('kek/')) {
      const kek = value as KekRecord;
      t.is(kek.refs, refs.get(kek.version) ?? 0, `refs of KEK version ${kek.version}`);
    } else if (key.startsWith('thread/')) {
      t.is(deks.get(value as string)?.state, 'active', `the key of ${key}`);
    }
  }
  const restoredDir = path.join(tempDir(t, 'pdb-restore-'), 'kms');
  const restored = await restoreCli(file, restoredDir, fx.keyFile);
  t.is(restored.code, 0, restored.stderr);
  const kms = await createKms({ dataDir: restoredDir, masterKeyFile: fx.keyFile, poolSize: 1 });
  t.teardown(() => kms.close());
  const status = await kms.rotationStatus();
  t.true(status.state === 'completed' || status.state === 'running');
  await kms.rotateKek();
});

test('a wrong master key, a flipped byte or a truncated file is refused and the target stays empty', async (t) => {
  const fx = await openKms(t);
  await Promise.all(Array.from({ length: 5 }, (_, i) => seal(fx.kms, `t-${i}`)));
  const file = path.join(fx.dir, 'kms.backup');
  const made = await cli(['backup', '--data-dir', fx.dataDir, '--out', file]);
  t.is(made.code, 0, made.stderr);
  const bytes = fs.readFileSync(file);
  const restoreDir = tempDir(t, 'pdb-restore-');
  const target = path.join(restoreDir, 'kms');
  const restore = (input: string, keyFile = fx.keyFile) => restoreCli(input, target, keyFile);

  // Each refusal into a target of its own, all at once (each is a process start).
  const wrongKey = writeMasterKey(restoreDir, undefined, 'other.key');
  const flipped = Buffer.from(bytes);
  const at = Math.floor(flipped.length / 2);
  flipped[at] = (flipped[at] as number) ^ 0x01;
  const damaged: [string, Buffer, string, RegExp][] = [
    [
      'wrong key',
      bytes,
      wrongKey.file,
      /MASTER_KEY_MISMATCH: the master key cannot unwrap the KEK of backup/,
    ],
    ['flipped byte', flipped, fx.keyFile, /STORE_CORRUPT: backup .* fails its SHA-256 checksum/],
    ...[bytes.length - 1, bytes.length - 30, Math.floor(bytes.length / 2), 0].map(
      (cut): [string, Buffer, string, RegExp] => [
        `cut at ${cut}`,
        bytes.subarray(0, cut),
        fx.keyFile,
        /STORE_CORRUPT: backup .* (is truncated|fails its SHA-256 checksum)/,
      ],
    ),
  ];
  const refusals = await Promise.all(
    damaged.map(async ([what, content, keyFile], i) => {
      const input = path.join(restoreDir, `case-${i}.backup`);
      fs.writeFileSync(input, content);
      const into = path.join(restoreDir, `target-${i}`);
      return { what, into, res: await restoreCli(input, into, keyFile) };
    }),
  );
  for (const [i, { what, into, res }] of refusals.entries()) {
    t.is(res.code, 1, what);
    t.regex(res.stderr, (damaged[i] as [string, Buffer, string, RegExp])[3], what);
    leftEmpty(t, into);
  }

  // A directory that holds a KMS already is refused before the file is even read.
  const occupied = await restoreCli(file, fx.dataDir, fx.keyFile);
  t.is(occupied.code, 1);
  t.regex(occupied.stderr, /REGISTRY_NOT_EMPTY/);

  // The right key on the undamaged file still restores.
  const ok = await restore(file);
  t.is(ok.code, 0, ok.stderr);
  t.regex(ok.stdout, /5 DEKs, 5 threads/);
});

test('an etcd registry: backed up at one revision, restored into a data directory and into an empty cluster prefix', async (t) => {
  const etcd = await EtcdCluster.start(1);
  t.teardown(() => etcd.stop());
  const admin = new Etcd3({ hosts: etcd.clientUrls });
  t.teardown(() => admin.close());
  const dir = tempDir(t, 'pdb-backup-etcd-');
  const { file: keyFile } = writeMasterKey(dir);
  const replica = (cluster: string, name: string) =>
    createKms({
      dataDir: path.join(dir, name),
      masterKeyFile: keyFile,
      poolSize: 1,
      registry: etcd.registryUrl,
      cluster,
    });
  const kms = await replica('backed', 'replica');
  t.teardown(() => kms.close());
  const sealed = await Promise.all(Array.from({ length: 20 }, (_, i) => seal(kms, `e-${i}`)));
  const file = path.join(dir, 'etcd.backup');
  const made = await cli(['backup', '--registry', etcd.registryUrl, '--cluster', 'backed', '--out', file]);
  t.is(made.code, 0, made.stderr);
  t.regex(
    made.stdout,
    /backed up \/progressdb-kms\/backed\/ at revision \d+ .* 1 KEK versions, 20 DEKs, 20 threads/,
  );
  const after = await seal(kms, 'e-after-backup');
  await kms.destroyDek((sealed[0] as Sealed).keyId);
  await kms.close();

  const restoredDir = path.join(dir, 'restored');
  const restored = await restoreCli(file, restoredDir, keyFile);
  t.is(restored.code, 0, restored.stderr);
  const single = await createKms({ dataDir: restoredDir, masterKeyFile: keyFile, poolSize: 1 });
  t.teardown(() => single.close());
  await opensAll(t, single, sealed);

  const intoEtcd = (cluster: string, key = keyFile) =>
    cli([
      'restore',
      '--in',
      file,
      '--registry',
      etcd.registryUrl,
      '--cluster',
      cluster,
      '--master-key-file',
      key,
    ]);
  const wrongKey = writeMasterKey(dir, undefined, 'other.key');
  const wrong = await intoEtcd('again', wrongKey.file);
  t.is(wrong.code, 1);
  t.regex(wrong.stderr, /MASTER_KEY_MISMATCH/);
  t.is((await admin.getAll().prefix('/progressdb-kms/again/').keys()).length, 0, 'nothing written to etcd');

  const copied = await intoEtcd('again');
  t.is(copied.code, 0, copied.stderr);
  t.regex(copied.stdout, /into \/progressdb-kms\/again\/: .* 1 KEK versions, 20 DEKs, 20 threads/);
  const cluster = await replica('again', 'replica-again');
  t.teardown(() => cluster.close());
  await opensAll(t, cluster, sealed);
  await expectCode(
    t,
    cluster.decrypt(after.keyId, after.ciphertext, Buffer.from(after.threadId)),
    'KEY_NOT_FOUND',
  );

  const [twice, occupied] = await Promise.all([intoEtcd('again'), intoEtcd('backed')]);
  t.is(twice.code, 1);
  t.regex(twice.stderr, /REGISTRY_NOT_EMPTY: \/progressdb-kms\/again\/ already holds a keyring/);
  t.is(occupied.code, 1);
  t.regex(occupied.stderr, /REGISTRY_NOT_EMPTY/);
});
