/**
 * A master re-key of a running cluster: put to a vote, committed only once every live replica
 * reads the new key and accepts both (src/kms/rekey.ts, src/kms/cluster-rekey-follower.ts). A
 * refusal, a silent replica or a proposer killed mid-vote leaves every replica on the current key;
 * after a commit every replica uses the new one and only the new one starts a replica.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { Etcd3 } from 'etcd3';
import type { Kms } from '../src/api/index.js';
import { createKms, type EmbeddedKmsHandle } from '../src/kms/index.js';
import { EtcdStore } from '../src/kms/registry/etcd.js';
import { REKEY_RECORD } from '../src/kms/registry/etcd-rekey.js';
import type { RekeyRecord } from '../src/kms/registry/store.js';
import { EtcdCluster } from './helpers/etcd.js';
import {
  allDecrypt,
  auditLines,
  expectCode,
  randomKeyHex,
  type Sealed,
  sealSome,
  startProcess,
  tempDir,
  writeMasterKey,
} from './helpers/kms.js';
import { until } from './helpers/processes.js';
import { KMS_CLI } from './helpers/server.js';

const LEASE_TTL_SECONDS = 2;

let etcd: EtcdCluster;
let clusters = 0;

test.before(async () => {
  etcd = await EtcdCluster.start(1);
});

test.after.always(async () => {
  await etcd?.stop();
});

interface Cluster {
  name: string;
  dir: string;
  oldKey: string;
  newKey: string;
  /** A replica of this cluster with its own data directory, closed with the test. */
  replica(name: string, masterKeyFile?: string): Promise<EmbeddedKmsHandle>;
  /** A member that joins the cluster and never answers a vote (a hung replica). */
  silentMember(name?: string): Promise<EtcdStore>;
  /** The cluster's store, opened without joining it: to watch. */
  observer(): Promise<EtcdStore>;
}

function newCluster(t: ExecutionContext): Cluster {
  const name = `rekey-${++clusters}`;
  const dir = tempDir(t, 'pdb-cluster-rekey-');
  const { file: oldKey } = writeMasterKey(dir);
  const newKey = path.join(dir, 'new.key');
  fs.writeFileSync(newKey, `${randomKeyHex()}\n`, { mode: 0o600 });
  return {
    name,
    dir,
    oldKey,
    newKey,
    async replica(replicaName, masterKeyFile = oldKey) {
      const kms = await createKms({
        dataDir: path.join(dir, replicaName),
        masterKeyFile,
        poolSize: 1,
        registry: etcd.registryUrl,
        cluster: name,
        replicaId: replicaName,
        leaseTtlSeconds: LEASE_TTL_SECONDS,
      });
      t.teardown(() => kms.close());
      return kms;
    },
    silentMember: (member = 'silent') => openStore(t, name, member),
    observer: () => openStore(t, name),
  };
}

async function openStore(t: ExecutionContext, cluster: string, memberId?: string): Promise<EtcdStore> {
  const client = new Etcd3({ hosts: etcd.clientUrls });
  const store = await EtcdStore.open({
    client,
    prefix: `/progressdb-kms/${cluster}/`,
    onClose: () => client.close(),
    ...(memberId !== undefined && { membership: { replicaId: memberId, ttlSeconds: LEASE_TTL_SECONDS } }),
  });
  t.teardown(() => store.close());
  return store;
}

/**
 * Which master key `replica`'s workers wrap new KEKs under: a rotation there makes KEK version
 * `n + 1`, which the registry accepts only if it is wrapped under the registry's master key, and
 * which `other` must then unwrap under its own to serve a DEK made after it.
 */
async function rotateAndUseOn(t: ExecutionContext, replica: Kms, other: Kms, label: string): Promise<void> {
  await replica.rotateKek();
  const [fresh] = await sealSome(replica, 1, `${label}-after-rotation`);
  await allDecrypt(
    t,
    other,
    [fresh as Sealed],
    `${label}: a DEK under the new KEK version opens on the other replica`,
  );
}

/** Replica `name` started again: `refused` is refused with MASTER_KEY_MISMATCH, `opens` opens every key. */
async function onlyKeyOpens(
  t: ExecutionContext,
  cluster: Cluster,
  name: string,
  keys: { refused: string; opens: string },
  sealed: Sealed[],
): Promise<void> {
  await expectCode(
    t,
    cluster.replica(name, keys.refused),
    'MASTER_KEY_MISMATCH',
    `${name}: a key that no longer opens`,
  );
  await allDecrypt(
    t,
    await cluster.replica(name, keys.opens),
    sealed,
    `${name}: restarted with the key that opens`,
  );
}

function rekeyLines(dataDir: string): string[] {
  return auditLines(dataDir)
    .filter((l) => l.op === 'rekey_master')
    .map((l) => String(l.detail));
}

/** Resolves once a replica has audited a re-key step matching `pattern` (it follows asynchronously). */
function rekeyAudited(dataDir: string, pattern: RegExp): Promise<true> {
  return until(`${path.basename(dataDir)} to audit ${pattern}`, () =>
    rekeyLines(dataDir).some((d) => pattern.test(d)) ? true : undefined,
  );
}

/** The next state of the cluster's re-key record that `accept` takes, seen through `store`'s watch. */
function nextRecord(store: EtcdStore, accept: (r: RekeyRecord | undefined) => boolean): Promise<void> {
  return new Promise((resolve) => {
    const off = store.watch(REKEY_RECORD, ({ value }) => {
      if (!accept(value as RekeyRecord | undefined)) return;
      off();
      resolve();
    });
  });
}

test.serial(
  'a cluster re-keyed online: every replica accepts, switches and serves on; afterwards only the new key starts one',
  async (t) => {
    const cluster = newCluster(t);
    const [a, b, c] = [await cluster.replica('a'), await cluster.replica('b'), await cluster.replica('c')];
    const sealed = [
      ...(await sealSome(a, 10, 'on-a')),
      ...(await sealSome(b, 10, 'on-b')),
      ...(await sealSome(c, 10, 'on-c')),
    ];
    // New threads on B and C while A re-keys: none may fail.
    let stop = false;
    let during = 0;
    const load = Promise.all(
      [b, c].map(async (kms, k) => {
        for (let i = 0; !stop; i++) {
          const made = await sealSome(kms, 1, `during-${k}-${i}`);
          await allDecrypt(t, k === 0 ? c : b, made, 'made during the re-key, opened on the other replica');
          during++;
        }
      }),
    );
    const result = await a.rekeyMaster({ newMasterKeyFile: cluster.newKey });
    stop = true;
    await load;
    t.is(result.kekVersions, 1);
    t.true(during > 0);
    for (const kms of [a, b, c]) await allDecrypt(t, kms, sealed, 'made before the re-key');

    // The followers audited their vote (before answering) and the commit (once they saw it).
    for (const name of ['b', 'c']) {
      const lines = rekeyLines(path.join(cluster.dir, name));
      t.true(
        lines.some((d) => /proposed by a: accepted, both keys valid until it commits/.test(d)),
        name,
      );
      await rekeyAudited(
        path.join(cluster.dir, name),
        /proposed by a: committed: only the new key from now on/,
      );
    }
    t.true(rekeyLines(path.join(cluster.dir, 'a')).some((d) => /committed, every live replica/.test(d)));

    // Each replica now wraps and unwraps KEKs under the new key: rotations on B then C are accepted
    // by the registry, and each new KEK version unwraps on another replica.
    await rotateAndUseOn(t, b, c, 'rotated on B');
    await rotateAndUseOn(t, c, a, 'rotated on C');

    await c.close();
    await onlyKeyOpens(t, cluster, 'c', { refused: cluster.oldKey, opens: cluster.newKey }, sealed);
  },
);

test.serial(
  'a replica refuses a proposal it cannot check, and the vote reports it; nothing changes',
  async (t) => {
    const cluster = newCluster(t);
    const b = await cluster.replica('b');
    const sealed = await sealSome(b, 5, 'before');
    const proposer = await cluster.silentMember();
    const vote = proposer.cluster?.rekey;
    if (vote === undefined) throw new Error('the store joined no cluster');
    const propose = async (target: string, kcv: Uint8Array) => {
      const record: RekeyRecord = {
        id: `proposal-${randomBytes(4).toString('hex')}`,
        by: proposer.cluster?.replicaId ?? '',
        state: 'proposed',
        target: { kind: 'file', path: target },
        kcv,
        fromKcv: new Uint8Array(16),
        proposedAt: new Date().toISOString(),
      };
      await vote.propose(record);
      const refused = await t.throwsAsync(vote.awaitAnswers(record.id, 10_000), { code: 'REKEY_REFUSED' });
      await vote.withdraw(record.id);
      return refused?.message ?? '';
    };
    // A key B reads, but not the one proposed (its check value differs); then a file B cannot read.
    t.regex(await propose(cluster.newKey, randomBytes(16)), /replica b refused .*is not the proposed one/);
    t.regex(
      await propose(path.join(cluster.dir, 'absent.key'), randomBytes(16)),
      /replica b refused .*MASTER_KEY/,
    );
    // B stayed on its key: its rotation is accepted, and its keys open.
    await rotateAndUseOn(t, b, b, 'rotated on B');
    await allDecrypt(t, b, sealed, 'after the refusals');
    t.is(rekeyLines(path.join(cluster.dir, 'b')).filter((d) => /refused:/.test(d)).length, 2);
  },
);

test.serial(
  'a silent replica: the vote times out, is withdrawn, and every replica goes back to the current key',
  async (t) => {
    const cluster = newCluster(t);
    const [a, b] = [await cluster.replica('a'), await cluster.replica('b')];
    const sealed = await sealSome(a, 5, 'before');
    const silent = await cluster.silentMember();
    const err = await expectCode(
      t,
      a.rekeyMaster({ newMasterKeyFile: cluster.newKey, voteTimeoutMs: 1500 }),
      'REGISTRY_UNAVAILABLE',
    );
    t.regex(
      err?.message ?? '',
      new RegExp(`replicas ${silent.cluster?.replicaId} did not answer the re-key proposal`),
    );
    t.is(await silent.cluster?.rekey.read(), undefined, 'the proposal was withdrawn');
    // B had accepted, and goes back once it sees the withdrawal: its rotation is then accepted
    // under the current key.
    await rekeyAudited(path.join(cluster.dir, 'b'), /withdrawn or lapsed: back to the current key/);
    await rotateAndUseOn(t, b, a, 'rotated on B');
    await rotateAndUseOn(t, a, b, 'rotated on A');
    await a.close();
    await onlyKeyOpens(t, cluster, 'a', { refused: cluster.newKey, opens: cluster.oldKey }, sealed);
  },
);

test.serial(
  'members that join during a vote count: a silent one holds it, a replica started with the current key accepts and follows',
  async (t) => {
    const cluster = newCluster(t);
    const a = await cluster.replica('a');
    const sealed = await sealSome(a, 5, 'before');
    const first = await cluster.silentMember('silent-first');
    const observer = await cluster.observer();
    const proposed = nextRecord(observer, (r) => r?.state === 'proposed');
    const vote = a.rekeyMaster({ newMasterKeyFile: cluster.newKey, voteTimeoutMs: 4000 });
    await proposed;
    // Both join after the proposal; the replica finds it at start and answers before it serves.
    const joined = await cluster.silentMember('silent-joined');
    const d = await cluster.replica('d');
    t.true(
      rekeyLines(path.join(cluster.dir, 'd')).some((l) => /proposed by a: accepted/.test(l)),
      'the replica that started mid-vote accepted',
    );
    await first.close();
    const err = await expectCode(t, vote, 'REGISTRY_UNAVAILABLE');
    t.regex(
      err?.message ?? '',
      /replicas silent-joined did not answer/,
      'only the silent joiner is waited for',
    );
    await rekeyAudited(path.join(cluster.dir, 'd'), /withdrawn or lapsed: back to the current key/);
    await joined.close();

    // With no silent member left the same re-key commits, and the late replica follows it.
    await a.rekeyMaster({ newMasterKeyFile: cluster.newKey });
    await rekeyAudited(path.join(cluster.dir, 'd'), /committed: only the new key from now on/);
    await rotateAndUseOn(t, d, a, 'rotated on the replica that joined mid-vote');
    await allDecrypt(t, d, sealed, 'every key on the late replica');
  },
);

test.serial(
  'kill -9 of the proposer mid-vote: its proposal lapses and the replicas go back; killed after the commit: they keep the new key',
  async (t) => {
    const cluster = newCluster(t);
    const [b, c] = [await cluster.replica('b'), await cluster.replica('c')];
    const sealed = await sealSome(b, 10, 'before');
    const rekeyCli = (dataDir: string) =>
      startProcess(t, process.execPath, [
        KMS_CLI,
        'rekey',
        '--data-dir',
        path.join(cluster.dir, dataDir),
        '--master-key-file',
        cluster.oldKey,
        '--new-master-key-file',
        cluster.newKey,
        '--registry',
        etcd.registryUrl,
        '--cluster',
        cluster.name,
        '--lease-ttl',
        String(LEASE_TTL_SECONDS),
      ]);

    // Mid-vote: a silent member holds the vote open until the proposer is killed.
    const silent = await cluster.silentMember();
    const observer = await cluster.observer();
    const proposed = nextRecord(observer, (r) => r?.state === 'proposed');
    const first = rekeyCli('cli-1');
    await proposed;
    const lapsed = nextRecord(observer, (r) => r === undefined);
    first.kill('SIGKILL');
    await first.exited;
    // Both keys are accepted meanwhile, and every key still opens.
    await allDecrypt(t, c, sealed, 'while the dead proposer still holds its lease');
    await lapsed;
    await rekeyAudited(path.join(cluster.dir, 'b'), /withdrawn or lapsed: back to the current key/);
    await silent.close();
    await c.close(); // restarted below: its start proves which key the registry has
    const cAgain = await cluster.replica('c-again');
    await allDecrypt(t, cAgain, sealed, 'the current key opens after the lapse');
    await rotateAndUseOn(t, b, cAgain, 'B went back to the current key');

    // After the commit: the proposer dies as soon as the record says committed.
    const committed = nextRecord(observer, (r) => r?.state === 'committed');
    const second = rekeyCli('cli-2');
    await committed;
    second.kill('SIGKILL');
    await second.exited;
    for (const name of ['b', 'c-again'])
      await rekeyAudited(path.join(cluster.dir, name), /committed: only the new key from now on/);
    await rotateAndUseOn(t, b, cAgain, 'B follows the committed key');
    await rotateAndUseOn(t, cAgain, b, 'C follows the committed key');
    await allDecrypt(t, b, sealed, 'after the commit');
    await cAgain.close();
    await onlyKeyOpens(t, cluster, 'c-again', { refused: cluster.oldKey, opens: cluster.newKey }, sealed);
  },
);
