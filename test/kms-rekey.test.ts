/**
 * Master re-key: every KEK version rewrapped under a new master key in one transaction, online
 * (the library, under load) and offline (the CLI); the old key refused at start afterwards; the
 * audit log, signed under both keys, verifying with the new one; kill -9 at any point leaving
 * exactly one of the two keys that opens the directory, with every key still decrypting.
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { createKms } from '../src/kms/index.js';
import { LmdbStore } from '../src/kms/registry/lmdb.js';
import { EtcdCluster } from './helpers/etcd.js';
import {
  allDecrypt,
  auditLines,
  expectCode,
  openKms,
  randomKeyHex,
  type Sealed,
  sealSome,
  startProcess,
  tempDir,
  writeMasterKey,
} from './helpers/kms.js';
import { KMS_CLI, runCli, startServer } from './helpers/server.js';

/** A second key file beside the first. */
function newKeyFile(dir: string, name = 'new.key'): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, `${randomKeyHex()}\n`, { mode: 0o600 });
  return file;
}

/** Kills of the offline command, spread evenly over the time a whole run takes. */
const KILL_POINTS = 4;

function rekeyArgs(dataDir: string, oldKey: string, newKey: string): string[] {
  return ['rekey', '--data-dir', dataDir, '--master-key-file', oldKey, '--new-master-key-file', newKey];
}

test('online re-key under load: nothing fails, old keys decrypt, the old master key is refused at start, the log verifies', async (t) => {
  const { kms, dir, dataDir, keyFile, reopen } = await openKms(t, { poolSize: 2 });
  const before = await sealSome(kms, 40, 'before');
  await kms.rotateKek();
  const newKey = newKeyFile(dir);
  // Encrypts and decrypts of fresh keys (their DEKs unwrapped from now on) run across the re-key.
  let stop = false;
  let ops = 0;
  const load = (async () => {
    for (let i = 0; !stop; i++) {
      const [s] = await sealSome(kms, 1, `during-${i}`);
      await allDecrypt(t, kms, [s as Sealed]);
      ops++;
    }
  })();
  const result = await kms.rekeyMaster({ newMasterKeyFile: newKey });
  stop = true;
  await load;
  t.true(ops > 0);
  t.is(result.kekVersions, 1);
  t.is(result.auditKeys, 1);
  await allDecrypt(t, kms, before);
  // A rotation after the re-key wraps its new KEK under the new master key.
  await kms.rotateKek();
  const after = await sealSome(kms, 10, 'after');
  t.true((await kms.verifyAudit()).ok, 'the live log, signed under the old key, verifies');
  const lines = auditLines(dataDir).filter((l) => l.op === 'rekey_master');
  t.deepEqual(
    lines.map((l) => [l.outcome, l.detail?.endsWith('committed') ?? false]),
    [
      ['ok', false],
      ['ok', true],
    ],
  );
  await kms.close();

  await expectCode(t, reopen({ masterKeyFile: keyFile }), 'MASTER_KEY_MISMATCH');
  const again = await reopen({ masterKeyFile: newKey });
  await allDecrypt(t, again, [...before, ...after]);
  t.true((await again.verifyAudit()).ok, 'both sessions verify with the new master key alone');
  const cli = await runCli(KMS_CLI, ['audit', 'verify', '--data-dir', dataDir, '--master-key-file', newKey]);
  t.is(cli.code, 0, cli.stderr);
});

test('a re-key to the same key, to a missing or malformed file, or during a rotation is refused and changes nothing', async (t) => {
  const { kms, dir, dataDir, keyFile, reopen } = await openKms(t);
  const sealed = await sealSome(kms, 5, 'kept');
  await expectCode(t, kms.rekeyMaster({ newMasterKeyFile: keyFile }), 'INVALID_INPUT');
  await expectCode(
    t,
    kms.rekeyMaster({ newMasterKeyFile: path.join(dir, 'absent.key') }),
    'MASTER_KEY_MISSING',
  );
  const bad = path.join(dir, 'bad.key');
  fs.writeFileSync(bad, 'not hex\n', { mode: 0o600 });
  await expectCode(t, kms.rekeyMaster({ newMasterKeyFile: bad }), 'MASTER_KEY_INVALID');
  const open = newKeyFile(dir, 'open.key');
  fs.chmodSync(open, 0o644);
  await expectCode(t, kms.rekeyMaster({ newMasterKeyFile: open }), 'MASTER_KEY_FILE_OPEN');
  await allDecrypt(t, kms, sealed);
  await kms.close();
  // A rotation left running (as a crash would leave it), not resumed: the re-key waits for it.
  const store = LmdbStore.open(dataDir);
  const rotation = (await store.get('rotation')) as object | undefined;
  await store.transaction({
    puts: [
      {
        key: 'rotation',
        value: { ...rotation, state: 'running', target: 2, cursor: null, done: 0, total: 5 },
      },
    ],
  });
  await store.close();
  const mid = await reopen({ masterKeyFile: keyFile, resumeRotation: false });
  await expectCode(
    t,
    mid.rekeyMaster({ newMasterKeyFile: newKeyFile(dir, 'next.key') }),
    'ROTATION_IN_PROGRESS',
  );
  await allDecrypt(t, mid, sealed);
  t.true((await mid.verifyAudit()).ok);
});

test('progressdb-kms rekey offline: the new key opens the directory, the old one is refused', async (t) => {
  const dir = tempDir(t, 'pdb-rekey-cli-');
  const { file: oldKey } = writeMasterKey(dir);
  const dataDir = path.join(dir, 'kms');
  const kms = await createKms({ dataDir, masterKeyFile: oldKey, poolSize: 1 });
  const sealed = await sealSome(kms, 20, 'cli');
  await kms.close();
  const newKey = newKeyFile(dir);
  const missing = await runCli(KMS_CLI, ['rekey', '--data-dir', dataDir, '--master-key-file', oldKey]);
  t.is(missing.code, 1);
  t.regex(missing.stderr, /CONFIG_INVALID: give the new master key: --new-master-key-file/);
  const res = await runCli(KMS_CLI, rekeyArgs(dataDir, oldKey, newKey));
  t.is(res.code, 0, res.stderr);
  t.regex(res.stdout, /re-keyed: 1 KEK versions now wrapped under .*new\.key/);
  const old = await runCli(KMS_CLI, ['audit', 'verify', '--data-dir', dataDir, '--master-key-file', oldKey]);
  t.is(old.code, 1);
  t.regex(old.stderr, /MASTER_KEY_MISMATCH: the master key cannot unwrap the registry's audit key/);
  const reopened = await createKms({ dataDir, masterKeyFile: newKey, poolSize: 1 });
  t.teardown(() => reopened.close());
  await allDecrypt(t, reopened, sealed);
  t.true((await reopened.verifyAudit()).ok);
});

test('kill -9 at any point of an offline re-key: exactly one key opens the directory and every key decrypts', async (t) => {
  const dir = tempDir(t, 'pdb-rekey-kill-');
  const { file: oldKey } = writeMasterKey(dir);
  const newKey = newKeyFile(dir);
  const template = path.join(dir, 'template');
  const kms = await createKms({ dataDir: template, masterKeyFile: oldKey, poolSize: 1 });
  const sealed = await sealSome(kms, 30, 'kill');
  await kms.close();
  const args = (dataDir: string) => [KMS_CLI, ...rekeyArgs(dataDir, oldKey, newKey)];
  // How long a whole run takes here, so that the kills below spread over it.
  const timed = path.join(dir, 'timed');
  fs.cpSync(template, timed, { recursive: true });
  const started = performance.now();
  const full = await startProcess(t, process.execPath, args(timed)).exited;
  const runMs = performance.now() - started;
  t.is(full.code, 0, full.stderr);

  const outcomes = { old: 0, new: 0 };
  for (let i = 1; i <= KILL_POINTS; i++) {
    const dataDir = path.join(dir, `run-${i}`);
    fs.cpSync(template, dataDir, { recursive: true });
    const child = startProcess(t, process.execPath, args(dataDir));
    await new Promise((resolve) => setTimeout(resolve, (runMs * i) / (KILL_POINTS + 1)));
    child.kill('SIGKILL');
    await child.exited;
    const opened: { key: string; kms: Awaited<ReturnType<typeof createKms>> }[] = [];
    for (const key of [oldKey, newKey]) {
      const attempt = await createKms({ dataDir, masterKeyFile: key, poolSize: 1 }).catch(
        (err: { code?: string }) => {
          t.is(err.code, 'MASTER_KEY_MISMATCH');
          return null;
        },
      );
      if (attempt !== null) {
        opened.push({ key, kms: attempt });
        await allDecrypt(t, attempt, sealed);
        t.true((await attempt.verifyAudit()).ok, `run ${i}: the log verifies`);
        await attempt.close();
      }
    }
    t.is(opened.length, 1, `run ${i}: exactly one master key opens the directory`);
    outcomes[opened[0]?.key === oldKey ? 'old' : 'new']++;
  }
  t.log(`killed before the commit ${outcomes.old} times, after it ${outcomes.new} times`);
});

test('the server re-keys its embedded KMS online: messages stay readable, and it starts again only with the new key', async (t) => {
  const server = await startServer();
  t.teardown(() => server.stop());
  const tid = await server.api.createThread();
  const posted = await server.api.postMessage(tid, { text: 'before the re-key' });
  t.is(posted.status, 201);
  const newKey = newKeyFile(server.dataDir);
  const bad = await server.admin.post('/admin/encryption/rekey-master', { new_master_key_file: 42 });
  t.is(bad.status, 400);
  t.is(bad.body.error.code, 'INVALID_INPUT');
  const res = await server.admin.post('/admin/encryption/rekey-master', { new_master_key_file: newKey });
  t.is(res.status, 200, JSON.stringify(res.body));
  t.deepEqual(res.body, { kek_versions: 1, audit_keys: 1 });
  const read = async (s: typeof server) => (await s.api.allMessages(tid)).map((m) => m.body);
  t.deepEqual(await read(server), [{ text: 'before the re-key' }]);
  await server.stop();

  const again = await server.restart({ env: { PROGRESSDB_KMS_MASTER_KEY_FILE: newKey } });
  t.teardown(() => again.stop());
  t.deepEqual(await read(again), [{ text: 'before the re-key' }]);
});

test("a cluster re-keyed offline: a replica's log verifies against the cluster's registry, which holds the earlier audit key", async (t) => {
  const etcd = await EtcdCluster.start(1);
  t.teardown(() => etcd.stop());
  const dir = tempDir(t, 'pdb-rekey-cluster-');
  const { file: oldKey } = writeMasterKey(dir);
  const dataDir = path.join(dir, 'replica');
  const cluster = ['--registry', etcd.registryUrl, '--cluster', 'rekeyed'];
  const replica = (masterKeyFile: string) =>
    createKms({ dataDir, masterKeyFile, poolSize: 1, registry: etcd.registryUrl, cluster: 'rekeyed' });
  const before = await replica(oldKey);
  const sealed = await sealSome(before, 5, 'cluster');
  await before.close();

  const newKey = newKeyFile(dir);
  const res = await runCli(KMS_CLI, [...rekeyArgs(dataDir, oldKey, newKey), ...cluster]);
  t.is(res.code, 0, res.stderr);
  const after = await replica(newKey);
  await allDecrypt(t, after, await sealSome(after, 2, 'after'));
  await allDecrypt(t, after, sealed);
  await after.close();

  // The replica's streams before the re-key are signed with the old master key's audit key, which
  // only the cluster's registry keeps (wrapped under the new key).
  const verify = (extra: string[]) =>
    runCli(KMS_CLI, ['audit', 'verify', '--data-dir', dataDir, '--master-key-file', newKey, ...extra]);
  const alone = await verify([]);
  t.is(alone.code, 1, 'without the cluster registry the earlier streams cannot be checked');
  t.regex(
    alone.stdout,
    /kms-audit\.log:1: stream \w+ is signed with audit key \w+, which this master key does not know/,
  );
  const withCluster = await verify(cluster);
  t.is(withCluster.code, 0, withCluster.stdout + withCluster.stderr);
  t.regex(withCluster.stdout, /^ok: \d+ lines verified/);
});
