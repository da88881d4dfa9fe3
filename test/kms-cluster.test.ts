/**
 * A KMS cluster end to end: three progressdb-kms replicas sharing one etcd registry (each with the
 * same master key file and its own data directory), reached by one client that knows all three.
 * Any replica serves any key, concurrent creates of one thread agree on its key, etcd holds
 * wrapped material only, and a replica killed with SIGKILL under load costs the callers nothing.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { Etcd3 } from 'etcd3';
import { unpack } from 'msgpackr';
import type { Kms } from '../src/api/index.js';
import { dekIdentity, kekIdentity, WRAP_KIND_DEK, WRAP_KIND_KEK } from '../src/format.js';
import type { DekRecord } from '../src/kms/dek-versions.js';
import { createRemoteKms } from '../src/remote/index.js';
import { loadRootKeys } from '../workers/master-key.js';
import { EtcdCluster } from './helpers/etcd.js';
import { tempDir, unwrapKey } from './helpers/kms.js';
import { type Daemon, keygen, spawnDaemon } from './helpers/kms-daemon.js';
import { startServer } from './helpers/server.js';

let etcd: EtcdCluster;
let replicas: Daemon[] = [];
/** Three replicas the first test starts and the tests after it that kill nothing share. */
let shared: [Daemon, Daemon, Daemon];
const clients: Kms[] = [];

/** Replicas of one cluster: the same master key file copied into each one's own directory. */
/** Directories of replicas that outlive the test that started them, removed at the end. */
const sharedDirs: string[] = [];

/** A temporary directory, removed with the test `t`, or at the end of the file when `t` is null. */
function replicaDir(t: ExecutionContext | null, prefix: string): string {
  if (t !== null) return tempDir(t, prefix);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  sharedDirs.push(dir);
  return dir;
}

async function startReplicas(
  t: ExecutionContext | null,
  count: number,
  cluster: string,
  { atOnce = false } = {},
): Promise<Daemon[]> {
  const keyDir = replicaDir(t, 'pdb-cluster-key-');
  const keyFile = await keygen(keyDir);
  const start = (i: number) => {
    const dir = replicaDir(t, `pdb-replica-${i}-`);
    fs.copyFileSync(keyFile, path.join(dir, 'master.key'));
    fs.chmodSync(path.join(dir, 'master.key'), 0o600);
    return spawnDaemon({
      dir,
      bridgePort: 0,
      env: { PROGRESSDB_KMS_REGISTRY: etcd.registryUrl, PROGRESSDB_KMS_CLUSTER: cluster },
    });
  };
  const started: Daemon[] = [];
  if (atOnce) started.push(...(await Promise.all(Array.from({ length: count }, (_, i) => start(i)))));
  else for (let i = 0; i < count; i++) started.push(await start(i));
  replicas.push(...started);
  return started;
}

function client(endpoints: string[]): Kms {
  const kms = createRemoteKms({ endpoints, timeoutMs: 5000 });
  clients.push(kms);
  return kms;
}

test.before(async () => {
  etcd = await EtcdCluster.start(3);
});

test.after.always(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await Promise.all(replicas.map((r) => r.kill9()));
  replicas = [];
  await etcd?.stop();
  for (const dir of sharedDirs) fs.rmSync(dir, { recursive: true, force: true });
});

test.serial(
  'any replica serves any key; concurrent creates of a thread on three replicas agree',
  async (t) => {
    shared = (await startReplicas(null, 3, 'shared')) as [Daemon, Daemon, Daemon];
    const [a, b, c] = shared;
    const [onA, onB, onC] = [a, b, c].map((d) => client([`http://${d.http}`])) as [Kms, Kms, Kms];
    const dek = await onA.createDekForThread('thread-1');
    const sealed = await onB.encrypt(dek.keyId, Buffer.from('written through B'), Buffer.from('aad'));
    t.is(
      (await onC.decrypt(dek.keyId, sealed.ciphertext, Buffer.from('aad'))).toString(),
      'written through B',
    );
    t.deepEqual(await onC.getWrappedDek(dek.keyId), dek);

    for (let i = 0; i < 10; i++) {
      const thread = `raced-${i}`;
      const made = await Promise.all([onA, onB, onC].map((kms) => kms.createDekForThread(thread)));
      t.is(new Set(made.map((d) => d.keyId)).size, 1, thread);
    }
    // The cluster knows every key once: the count is the same seen from each replica.
    const counts = await Promise.all([onA, onB, onC].map(async (kms) => (await kms.health()).dekCount));
    t.deepEqual(counts, [11, 11, 11]);
  },
);

test.serial(
  'replicas started at once on an empty cluster agree on one KEK, and keys made anywhere survive a restart',
  async (t) => {
    const started = await startReplicas(t, 3, 'first-start', { atOnce: true });
    const clientsOf = started.map((d) => client([`http://${d.http}`]));
    const healths = await Promise.all(clientsOf.map((kms) => kms.health()));
    t.is(new Set(healths.map((h) => h.kekId)).size, 1, 'one KEK id across the replicas');
    const made = await Promise.all(clientsOf.map((kms, i) => kms.createDekForThread(`first-${i}`)));
    const sealed = await Promise.all(
      made.map((dek, i) => clientsOf[i]?.encrypt(dek.keyId, Buffer.from(`k${i}`))),
    );
    // Every replica restarted: each key must unwrap under the KEK the registry holds, wherever made.
    await Promise.all(started.map((d) => d.kill9()));
    const again = await spawnDaemon({
      dir: (started[0] as Daemon).dir,
      bridgePort: 0,
      env: { PROGRESSDB_KMS_REGISTRY: etcd.registryUrl, PROGRESSDB_KMS_CLUSTER: 'first-start' },
    });
    replicas.push(again);
    const kms = client([`http://${again.http}`]);
    for (const [i, dek] of made.entries()) {
      const ciphertext = sealed[i]?.ciphertext as Buffer;
      t.is((await kms.decrypt(dek.keyId, ciphertext)).toString(), `k${i}`);
    }
  },
);

test.serial('right after a destroy returns on one replica, the others refuse the key', async (t) => {
  const [onA, onB, onC] = shared.map((d) => client([`http://${d.http}`])) as [Kms, Kms, Kms];
  const whole = await onA.createDekForThread('destroyed-whole');
  const sealed = await onB.encrypt(whole.keyId, Buffer.from('soon unreadable'));
  const partial = await onA.createDekForThread('destroyed-old-version');
  const old = await onB.encrypt(partial.keyId, Buffer.from('version 1'));
  await onA.rotateDek(partial.keyId);
  await onA.destroyDek(whole.keyId);
  await onA.destroyDekVersionsBefore(partial.keyId, 2);
  // destroyDek resolved only once every live replica had applied it: B and C refuse at once. A
  // destroyed version reads as a failed decryption, as it does on one node.
  const refused = (p: Promise<unknown>) =>
    p.then(
      () => undefined,
      (err: { code?: string }) => err.code,
    );
  for (const [name, kms] of [
    ['B', onB],
    ['C', onC],
  ] as const) {
    t.is(
      await refused(kms.decrypt(whole.keyId, sealed.ciphertext)),
      'KEY_NOT_FOUND',
      `${name}: destroyed key`,
    );
    t.is(
      await refused(kms.decrypt(partial.keyId, old.ciphertext)),
      'DECRYPT_FAILED',
      `${name}: destroyed version`,
    );
  }
  const fresh = await onB.encrypt(partial.keyId, Buffer.from('version 2'));
  t.is(fresh.keyVersion, 2);
});

test.serial('etcd holds wrapped material only: no master key, KEK or DEK in the clear', async (t) => {
  const [a] = shared;
  const kms = client([`http://${a.http}`]);
  const deks = await Promise.all(Array.from({ length: 5 }, (_, i) => kms.createDekForThread(`secret-${i}`)));
  await kms.rotateDek(deks[0]?.keyId as string);
  await kms.rotateKek();
  // The test knows the master key, so it can unwrap what etcd holds and look for the clear keys.
  const hex = fs.readFileSync(a.masterKeyFile, 'utf8').trim();
  const roots = loadRootKeys({ kind: 'file', path: a.masterKeyFile });
  const admin = new Etcd3({ hosts: etcd.clientUrls });
  const values = (await admin.getAll().prefix('/progressdb-kms/shared/').buffers()) as Record<string, Buffer>;
  admin.close();
  const stored = Object.entries(values);
  const clear: [string, Buffer][] = [
    ['master key', Buffer.from(hex, 'hex')],
    ['master key hex', Buffer.from(hex)],
    ['KEK-wrapping key', roots.kekWrapKey],
    ['audit key', roots.auditKey],
  ];
  const keks = new Map<number, Buffer>();
  for (const [key, value] of stored) {
    if (!key.includes('/kek/')) continue;
    const kek = unpack(value) as { kekId: string; version: number; wrapped: Uint8Array };
    const raw = unwrapKey(
      roots.kekWrapKey,
      WRAP_KIND_KEK,
      0,
      kekIdentity(kek.kekId, kek.version),
      kek.wrapped,
    );
    keks.set(kek.version, raw);
    clear.push([`KEK ${kek.version}`, raw]);
  }
  let dekVersions = 0;
  for (const [key, value] of stored) {
    if (!key.includes('/dek/')) continue;
    const record = unpack(value) as DekRecord;
    for (const v of record.versions) {
      const kek = keks.get(v.kek) as Buffer;
      clear.push([
        `DEK ${record.keyId} v${v.v}`,
        unwrapKey(kek, WRAP_KIND_DEK, v.kek, dekIdentity(record.keyId, v.v), v.wrapped),
      ]);
      dekVersions++;
    }
  }
  // Five keys here, one rotated once, beside what the earlier tests on these replicas made.
  t.true(dekVersions >= 6, `${dekVersions} DEK versions unwrapped`);
  t.true(keks.size >= 1);
  for (const [what, bytes] of clear) {
    const found = stored.filter(([, value]) => value.includes(bytes)).map(([key]) => key);
    t.deepEqual(found, [], `${what} is not stored in etcd`);
  }
});

test.serial(
  'an external-mode server starts with one of three replicas down, and serves through the others',
  async (t) => {
    const started = await startReplicas(t, 3, 'server');
    await started[0]?.kill9();
    const server = await startServer({
      mode: 'external',
      kmsEndpoint: started.map((d) => `http://${d.http}`).join(','),
    });
    t.teardown(() => server.stop());
    const thread = await server.api.createThread('on a cluster');
    for (let i = 0; i < 5; i++) t.is((await server.api.postMessage(thread, { text: `m${i}` })).status, 201);
    await started[1]?.kill9();
    const read = await server.api.allMessages(thread);
    t.deepEqual(read.map((m) => (m.body as { text: string }).text).sort(), ['m0', 'm1', 'm2', 'm3', 'm4']);
  },
);

for (const transport of ['http', 'tcp'] as const) {
  test.serial(
    `${transport}: a replica killed under load: every call of a three-replica client succeeds`,
    async (t) => {
      const started = await startReplicas(t, 3, `failover-${transport}`);
      const endpoints = started.map((d) => (transport === 'http' ? `http://${d.http}` : `tcp://${d.bridge}`));
      const kms = client(endpoints);
      const keys = await Promise.all(
        Array.from({ length: 16 }, (_, i) => kms.createDekForThread(`load-${i}`)),
      );
      let stop = false;
      let calls = 0;
      const failures: string[] = [];
      const worker = async (w: number) => {
        for (let n = 0; !stop; n++) {
          const dek = keys[(w + n) % keys.length] as (typeof keys)[number];
          try {
            const body = Buffer.from(`w${w} n${n}`);
            const sealed = await kms.encrypt(dek.keyId, body);
            const opened = await kms.decrypt(dek.keyId, sealed.ciphertext);
            if (!opened.equals(body)) failures.push(`w${w} n${n}: wrong plaintext`);
            calls += 2;
          } catch (err) {
            failures.push(`${(err as { code?: string }).code}: ${(err as Error).message}`);
          }
        }
      };
      const load = Promise.all(Array.from({ length: 32 }, (_, w) => worker(w)));
      const before = await waitForCalls(() => calls, 500);
      await started[1]?.kill9();
      const atKill = calls;
      await waitForCalls(() => calls - atKill, 2000);
      stop = true;
      await load;
      t.deepEqual(failures, []);
      t.true(calls > before, `${calls} calls`);
    },
  );
}

/**
 * Resolves once `count()` has reached `n` (the load is making progress), polling every few ms: a
 * poll on every tick would keep a core busy that the replicas under load need.
 */
async function waitForCalls(count: () => number, n: number): Promise<number> {
  const deadline = Date.now() + 30_000;
  while (count() < n) {
    if (Date.now() > deadline) throw new Error(`only ${count()} calls of ${n} in 30 s`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return count();
}
