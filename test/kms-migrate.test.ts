/**
 * `progressdb-kms migrate`: a single-node data directory's registry copied into an etcd cluster
 * prefix, then served by replicas. Real etcd members, the real CLI and replicas as child
 * processes; a migration killed with SIGKILL half-way leaves the target refused until a re-run
 * finishes it.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { Etcd3 } from 'etcd3';
import type { Kms } from '../src/api/index.js';
import { createKms } from '../src/kms/index.js';
import { LmdbStore } from '../src/kms/registry/lmdb.js';
import { createRemoteKms } from '../src/remote/index.js';
import { EtcdCluster } from './helpers/etcd.js';
import { tempDir, writeMasterKey } from './helpers/kms.js';
import { type Daemon, daemonRefuses, spawnDaemon } from './helpers/kms-daemon.js';
import { cleanEnv, until } from './helpers/processes.js';
import { KMS_CLI, runCli } from './helpers/server.js';

let etcd: EtcdCluster;
let admin: Etcd3;
const daemons: Daemon[] = [];
const clients: Kms[] = [];

test.before(async () => {
  etcd = await EtcdCluster.start(3);
  admin = new Etcd3({ hosts: etcd.clientUrls });
});

test.after.always(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await Promise.all(daemons.map((d) => d.kill9()));
  admin?.close();
  await etcd?.stop();
});

interface Source {
  dir: string;
  dataDir: string;
  keyFile: string;
  /** Each thread's key and a ciphertext made under it before the migration. */
  sealed: { threadId: string; keyId: string; ciphertext: Buffer }[];
}

/** A single-node KMS directory with `threads` thread keys, after a completed KEK rotation if `rotate`. */
async function singleNode(
  t: ExecutionContext,
  threads: number,
  sealEvery: number,
  rotate = false,
): Promise<Source> {
  const dir = tempDir(t, 'pdb-migrate-src-');
  const { file } = writeMasterKey(dir);
  const dataDir = path.join(dir, 'kms');
  const kms = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
  const sealed: Source['sealed'] = [];
  try {
    for (let i = 0; i < threads; i += 1000) {
      const keys = await Promise.all(
        Array.from({ length: Math.min(1000, threads - i) }, (_, j) =>
          kms.createDekForThread(`thread-${i + j}`),
        ),
      );
      for (const [j, k] of keys.entries()) {
        if ((i + j) % sealEvery !== 0) continue;
        const { ciphertext } = await kms.encrypt(k.keyId, Buffer.from(k.threadId), Buffer.from(k.threadId));
        sealed.push({ threadId: k.threadId, keyId: k.keyId, ciphertext });
      }
    }
    if (rotate) await kms.rotateKek();
  } finally {
    await kms.close();
  }
  return { dir, dataDir, keyFile: file, sealed };
}

/** The migrate command line copying `source` into `cluster`. */
function migrateArgs(source: Source, cluster: string): string[] {
  return ['migrate', '--from-data-dir', source.dataDir, '--registry', etcd.registryUrl, '--cluster', cluster];
}

function migrate(source: Source, cluster: string) {
  return runCli(KMS_CLI, migrateArgs(source, cluster), { env: cleanEnv(), timeoutMs: 120_000 });
}

/** A replica of `cluster` with the source's master key and a fresh data directory of its own. */
async function replica(t: ExecutionContext, source: Source, cluster: string, id: string): Promise<Daemon> {
  const dir = tempDir(t, `pdb-migrate-${id}-`);
  fs.copyFileSync(source.keyFile, path.join(dir, 'master.key'));
  fs.chmodSync(path.join(dir, 'master.key'), 0o600);
  const daemon = await spawnDaemon({
    dir,
    args: ['--registry', etcd.registryUrl, '--cluster', cluster, '--replica-id', id],
  });
  daemons.push(daemon);
  return daemon;
}

function clientOf(replicas: Daemon[]): Kms {
  const kms = createRemoteKms({ endpoints: replicas.map((d) => `http://${d.http}`), timeoutMs: 10_000 });
  clients.push(kms);
  return kms;
}

async function everyOldCiphertextDecrypts(t: ExecutionContext, kms: Kms, source: Source): Promise<void> {
  const opened = await Promise.all(
    source.sealed.map((s) => kms.decrypt(s.keyId, s.ciphertext, Buffer.from(s.threadId))),
  );
  t.deepEqual(
    opened.map((p) => p.toString()),
    source.sealed.map((s) => s.threadId),
  );
}

test.serial(
  'migrate, then every old ciphertext decrypts through the cluster and each thread keeps its key',
  async (t) => {
    const source = await singleNode(t, 1200, 10, true);
    const res = await migrate(source, 'moved');
    t.is(res.code, 0, res.stderr);
    t.regex(
      res.stdout,
      /migrated .* into \/progressdb-kms\/moved\/: KEK \S+ \(active version 2\), 1 KEK versions, 1200 DEKs, 1200 threads/,
    );

    const [a, b] = await Promise.all([
      replica(t, source, 'moved', 'moved-a'),
      replica(t, source, 'moved', 'moved-b'),
    ]);
    await everyOldCiphertextDecrypts(t, clientOf([a]), source);
    await everyOldCiphertextDecrypts(t, clientOf([b]), source);
    // The thread index came along: creating an old thread's key again answers the old key.
    const old = source.sealed[1] as Source['sealed'][number];
    t.is((await clientOf([b]).createDekForThread(old.threadId)).keyId, old.keyId);
    const fresh = await clientOf([a]).createDekForThread('thread-after-migration');
    t.is((await clientOf([b]).createDekForThread('thread-after-migration')).keyId, fresh.keyId);

    // A second migration into the same prefix, of this or any other directory, is refused.
    const twice = await migrate(source, 'moved');
    t.is(twice.code, 1);
    t.regex(twice.stderr, /REGISTRY_NOT_EMPTY: \/progressdb-kms\/moved\/ already holds a keyring/);
    t.notRegex(twice.stderr, /\n\s+at /);
  },
);

test.serial(
  'a source with a rotation in progress, no registry, or a live KMS is refused, and etcd is left empty',
  async (t) => {
    const source = await singleNode(t, 20, 5);
    const store = LmdbStore.open(source.dataDir);
    const rotation = await store.get('rotation');
    await store.transaction({
      puts: [{ key: 'rotation', value: { ...(rotation as object), state: 'running', done: 3, total: 20 } }],
    });
    await store.close();
    const midRotation = await migrate(source, 'refused');
    t.is(midRotation.code, 1);
    t.regex(
      midRotation.stderr,
      /CONFIG_INVALID: .* has a KEK rotation in progress \(3\/20\): finish it first/,
    );

    const empty = tempDir(t, 'pdb-migrate-empty-');
    const none = await runCli(
      KMS_CLI,
      ['migrate', '--from-data-dir', empty, '--registry', etcd.registryUrl, '--cluster', 'refused'],
      {
        env: cleanEnv(),
      },
    );
    t.is(none.code, 1);
    t.regex(none.stderr, /CONFIG_INVALID: .* holds no KMS registry/);
    t.deepEqual(fs.readdirSync(empty), [], 'nothing was created in it');

    const live = await singleNode(t, 5, 1);
    const kms = await createKms({ dataDir: live.dataDir, masterKeyFile: live.keyFile, poolSize: 1 });
    t.teardown(() => kms.close());
    const locked = await migrate(live, 'refused');
    t.is(locked.code, 1);
    t.regex(locked.stderr, /DATA_DIR_LOCKED/);

    const lmdbTarget = await runCli(KMS_CLI, ['migrate', '--from-data-dir', source.dataDir], {
      env: cleanEnv(),
    });
    t.is(lmdbTarget.code, 1);
    t.regex(lmdbTarget.stderr, /CONFIG_INVALID: migrate copies into an etcd registry/);

    t.is((await admin.getAll().prefix('/progressdb-kms/refused/').keys()).length, 0);
  },
);

test.serial(
  'kill -9 mid-way: replicas refuse the half-copied prefix with REGISTRY_MIGRATING; a re-run finishes it',
  async (t) => {
    const source = await singleNode(t, 5000, 125);
    const prefix = '/progressdb-kms/killed/';
    const child = spawn(process.execPath, [KMS_CLI, ...migrateArgs(source, 'killed')], {
      env: cleanEnv(),
      stdio: 'ignore',
    });
    const exited = new Promise<NodeJS.Signals | null>((resolve) =>
      child.on('exit', (_code, signal) => resolve(signal)),
    );
    // Some DEK records copied, the thread index not yet: well inside the copy.
    await until(
      'the copy under way',
      async () => ((await admin.getAll().prefix(`${prefix}dek/`).count()) > 1000 ? true : undefined),
      60_000,
    );
    child.kill('SIGKILL');
    t.is(await exited, 'SIGKILL');
    const left = await admin.getAll().prefix(prefix).keys();
    t.true(left.includes(`${prefix}meta/migrating`), 'the kill landed before the commit');
    t.false(left.includes(`${prefix}meta/kek`));

    const dir = tempDir(t, 'pdb-migrate-early-');
    fs.copyFileSync(source.keyFile, path.join(dir, 'master.key'));
    fs.chmodSync(path.join(dir, 'master.key'), 0o600);
    // Another source may not take over the half-copied prefix (run beside the replica's start).
    const other = await singleNode(t, 5, 1);
    const hijacking = migrate(other, 'killed');
    const refused = await daemonRefuses([
      '--listen',
      '127.0.0.1:0',
      '--data-dir',
      path.join(dir, 'kms'),
      '--master-key-file',
      path.join(dir, 'master.key'),
      '--registry',
      etcd.registryUrl,
      '--cluster',
      'killed',
    ]);
    t.is(refused.code, 1);
    t.regex(
      refused.stderr,
      /REGISTRY_MIGRATING: a migration from .* has not finished: run progressdb-kms migrate again/,
    );

    const hijack = await hijacking;
    t.is(hijack.code, 1);
    t.regex(hijack.stderr, /REGISTRY_NOT_EMPTY: .* is being migrated from/);

    const rerun = await migrate(source, 'killed');
    t.is(rerun.code, 0, rerun.stderr);
    t.regex(rerun.stdout, /finished the interrupted migration .* 5000 DEKs, 5000 threads/);
    const a = await replica(t, source, 'killed', 'killed-a');
    await everyOldCiphertextDecrypts(t, clientOf([a]), source);
  },
);
