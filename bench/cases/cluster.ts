/**
 * Case 9: a KMS cluster of three `progressdb-kms serve` replicas sharing one registry in a
 * 3-member etcd, each with the same master key and its own data dir.
 *
 * a. Throughput: a closed-loop HTTP encrypt load (64 callers, 1 KiB, spread over 1,000 thread
 *    DEKs) through createRemoteKms given all three endpoints, against the same load on one daemon
 *    with the default LMDB registry.
 * b. Failover: p99 latency of a load window in which one replica is killed with SIGKILL against
 *    the p99 of a steady window on the same three replicas; calls that failed are counted. The
 *    killed replica is restarted (same address and data dir) between rounds, and each window gets
 *    a fresh client, so no round inherits the last one's view of which replicas are up.
 * c. KEK rotation of N DEKs (100,000; 5,000 in quick runs) on etcd against the same on LMDB,
 *    each through the library (createKms, `registry` pointing at etcd), with their defaults.
 */
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Etcd3 } from 'etcd3';
import { EtcdCluster } from '../etcd.js';
import {
  alternate,
  type BenchContext,
  type CaseReport,
  closedLoop,
  fmt,
  type KmsDaemon,
  type Metric,
  median,
  medians,
  metric,
  payloadOf,
  percentile,
  round,
  seededDir,
  startKmsDaemon,
} from '../lib.js';
import { createKms, createRemoteKms, generateMasterKeyFile, type Kms } from '../product.js';

export const caseNo = 9;
export const name = 'cluster';

const REPLICAS = 3;
const CALLERS = 64;
/** The etcd registry's rotation batch: one etcd transaction (at most 128 ops) per batch. */
const ETCD_ROTATION_BATCH = 40;

interface LoadWindow {
  opsPerSec: number;
  p99Ms: number;
  calls: number;
  failed: number;
}

/** `CALLERS` closed loops of encrypt over `keys` in turn; failures are counted, not thrown. */
async function encryptLoad(kms: Kms, keys: string[], ms: number, payload: Buffer): Promise<LoadWindow> {
  let next = 0;
  let failed = 0;
  const r = await closedLoop(
    CALLERS,
    ms,
    async () => {
      try {
        await kms.encrypt(keys[next++ % keys.length]!, payload);
      } catch {
        failed++;
      }
    },
    true,
  );
  return {
    opsPerSec: ((r.latenciesUs.length - failed) / r.latenciesUs.length) * r.opsPerSec,
    p99Ms: percentile(r.latenciesUs, 99) / 1000,
    calls: r.latenciesUs.length,
    failed,
  };
}

/** `n` thread DEKs created through `kms`, `concurrency` at a time; returns their key ids. */
async function createKeys(
  kms: Kms,
  n: number,
  concurrency: number,
  prefix: string,
  onProgress?: (done: number) => void,
): Promise<string[]> {
  const keys: string[] = new Array(n);
  let next = 0;
  let lastReport = performance.now();
  await Promise.all(
    Array.from({ length: Math.min(concurrency, n) }, async () => {
      for (let i = next++; i < n; i = next++) {
        keys[i] = (await kms.createDekForThread(`${prefix}-${i}`)).keyId;
        if (onProgress && performance.now() - lastReport > 10_000) {
          lastReport = performance.now();
          onProgress(Math.min(next, n));
        }
      }
    }),
  );
  return keys;
}

function remote(daemons: readonly KmsDaemon[]): Kms {
  return createRemoteKms({ endpoints: daemons.map((d) => `http://${d.http}`) });
}

/**
 * What etcd itself costs, for the rotation note: a transaction of ETCD_ROTATION_BATCH puts of
 * DEK-record-sized values behind one compare (as a fenced rotation batch), and one get.
 */
async function rawEtcd(hosts: string[]): Promise<{ txnMs: number; getMs: number }> {
  const client = new Etcd3({ hosts });
  const prefix = '/progressdb-bench-raw/';
  const value = Buffer.alloc(240, 7);
  const key = (j: number) => `${prefix}${String(j).padStart(4, '0')}`;
  try {
    const n = 40;
    let t0 = performance.now();
    for (let i = 0; i < n; i++) {
      const puts = Array.from({ length: ETCD_ROTATION_BATCH }, (_, j) => client.put(key(j)).value(value));
      await client
        .if(`${prefix}fence`, 'Version', '==', 0)
        .then(...puts)
        .commit();
    }
    const txnMs = (performance.now() - t0) / n;
    t0 = performance.now();
    for (let i = 0; i < n * 4; i++) await client.get(key(i % ETCD_ROTATION_BATCH)).buffer();
    const getMs = (performance.now() - t0) / (n * 4);
    await client.delete().prefix(prefix);
    return { txnMs, getMs };
  } finally {
    client.close();
  }
}

/** rotateKek() on an open KMS holding `expected` DEKs; DEKs rewrapped per second. */
async function rotate(kms: Kms, expected: number): Promise<number> {
  const t0 = performance.now();
  const status = await kms.rotateKek();
  const seconds = (performance.now() - t0) / 1000;
  if (status.state !== 'completed' || status.total !== expected) {
    throw new Error(
      `rotation ended ${status.state} with ${status.done}/${status.total} (expected ${expected})`,
    );
  }
  return expected / seconds;
}

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const quick = ctx.mode === 'quick';
  const threads = quick ? 200 : 1000;
  // 100,000 DEKs, as the issue asks and case 5 does: a few minutes here (seeding ~1k DEKs/s and
  // rotating ~2k DEKs/s on etcd), so at most 3 rounds of it.
  const deks = quick ? 1000 : 100_000;
  const rotationRounds = quick ? ctx.rounds : Math.min(ctx.rounds, 3);
  // Timed windows no shorter than 1 s (0.3 s quick): a window must outlast the load ramping up.
  const loadMs = Math.max(ctx.ms, quick ? 300 : 1000);
  const failoverMs = quick ? 1200 : 3000;
  const payload = payloadOf(1024);
  const metrics: Metric[] = [];
  const details: Record<string, unknown> = {};
  const notes: string[] = [];

  const keyDir = ctx.tmp('cluster-key-');
  const masterKeyFile = path.join(keyDir, 'master.key');
  await generateMasterKeyFile(masterKeyFile);
  const t0 = performance.now();
  const etcd = await EtcdCluster.start(3);
  ctx.progress(`  3-member etcd up in ${fmt((performance.now() - t0) / 1000, 1)} s`);
  const replicaEnv = { PROGRESSDB_KMS_REGISTRY: etcd.registryUrl, PROGRESSDB_KMS_CLUSTER: 'bench-load' };
  const replicas: KmsDaemon[] = [];
  let single: KmsDaemon | null = null;
  const clients = new Set<Kms>();
  const client = (daemons: readonly KmsDaemon[]) => {
    const kms = remote(daemons);
    clients.add(kms);
    return kms;
  };
  const closeClient = async (kms: Kms) => {
    clients.delete(kms);
    await kms.close();
  };
  let rotationKms: Kms[] = [];
  try {
    // All four at once; each that started is stopped in `finally` even if another did not.
    const settled = await Promise.allSettled([
      ...Array.from({ length: REPLICAS }, (_, i) =>
        startKmsDaemon(ctx, { masterKeyFile, env: replicaEnv, name: `kms replica ${i}` }),
      ),
      startKmsDaemon(ctx, { masterKeyFile, name: 'kms (lmdb)' }),
    ]);
    for (const [i, r] of settled.entries()) {
      if (r.status !== 'fulfilled') continue;
      if (i < REPLICAS) replicas.push(r.value);
      else single = r.value;
    }
    for (const r of settled) if (r.status === 'rejected') throw r.reason;
    if (single === null) throw new Error('the single daemon did not start');

    // --- a. throughput: 3 replicas on etcd vs 1 daemon on LMDB ----------------------------------
    const onCluster = client(replicas);
    const onSingle = client([single]);
    const clusterKeys = await createKeys(onCluster, threads, CALLERS, 'bench-cluster');
    const singleKeys = await createKeys(onSingle, threads, CALLERS, 'bench-cluster');
    // Warm-up: connections, JIT, every DEK unwrapped once on every replica's workers.
    await encryptLoad(onCluster, clusterKeys, Math.max(loadMs, 1000), payload);
    await encryptLoad(onSingle, singleKeys, Math.max(loadMs, 1000), payload);
    const failedThroughput = { cluster: 0, single: 0 };
    const tput = await alternate(
      ctx.rounds,
      {
        cluster: async () => {
          const w = await encryptLoad(onCluster, clusterKeys, loadMs, payload);
          failedThroughput.cluster += w.failed;
          return w.opsPerSec;
        },
        single: async () => {
          const w = await encryptLoad(onSingle, singleKeys, loadMs, payload);
          failedThroughput.single += w.failed;
          return w.opsPerSec;
        },
      },
      (r, last) =>
        ctx.progress(
          `  throughput round ${r + 1}/${ctx.rounds}: 3 replicas on etcd ${fmt(last.cluster)} ops/s, ` +
            `1 daemon on LMDB ${fmt(last.single)} ops/s`,
        ),
    );
    if (failedThroughput.cluster + failedThroughput.single > 0) {
      throw new Error(
        `encrypt calls failed under steady load: ${failedThroughput.cluster} on the cluster, ` +
          `${failedThroughput.single} on the single daemon`,
      );
    }
    await closeClient(onCluster);
    await closeClient(onSingle);
    await single.child.stop();
    single = null;
    const tputMed = medians(tput);
    metrics.push(
      metric({
        id: 'cluster_throughput',
        caseNo,
        title: `HTTP encrypt 1 KiB, ${CALLERS} callers over ${fmt(threads)} DEKs: ${REPLICAS} replicas on a 3-member etcd vs 1 daemon on LMDB`,
        figure: tputMed.cluster,
        figureLabel: `${REPLICAS} replicas, etcd`,
        baseline: tputMed.single,
        baselineLabel: '1 daemon, LMDB',
        unit: 'ops/s',
        target: 1.0,
        better: 'higher',
      }),
    );
    details.throughput = { samples: tput, windowMs: loadMs, threads };

    // --- b. p99 while one replica is killed -9, vs a steady window ----------------------------
    let kills = 0;
    const killed: Record<string, number>[] = [];
    const failover = { calls: 0, failed: 0 };
    const steadyStats = { calls: 0, failed: 0 };
    const window = async (kill: boolean): Promise<number> => {
      const kms = client(replicas);
      try {
        await encryptLoad(kms, clusterKeys, 300, payload);
        if (!kill) {
          const w = await encryptLoad(kms, clusterKeys, failoverMs, payload);
          steadyStats.calls += w.calls;
          steadyStats.failed += w.failed;
          return w.p99Ms;
        }
        const i = kills++ % REPLICAS;
        const victim = replicas[i]!;
        const loading = encryptLoad(kms, clusterKeys, failoverMs, payload);
        await sleep(failoverMs / 3);
        await victim.child.kill9();
        const w = await loading;
        failover.calls += w.calls;
        failover.failed += w.failed;
        killed.push({ replica: i, calls: w.calls, failed: w.failed, p99Ms: round(w.p99Ms, 2) });
        // Back at the same address, from the same data dir, for the next round.
        const t = performance.now();
        replicas[i] = await startKmsDaemon(ctx, {
          masterKeyFile,
          env: replicaEnv,
          http: victim.http,
          dataDir: victim.dataDir,
          name: `kms replica ${i}`,
        });
        killed.at(-1)!.restartSeconds = round((performance.now() - t) / 1000, 2);
        return w.p99Ms;
      } finally {
        await closeClient(kms);
      }
    };
    const p99 = await alternate(
      ctx.rounds,
      { kill: () => window(true), steady: () => window(false) },
      (r, last) =>
        ctx.progress(
          `  failover round ${r + 1}/${ctx.rounds}: p99 ${fmt(last.kill, 1)} ms with a replica killed -9, ` +
            `${fmt(last.steady, 1)} ms steady; ${killed.at(-1)?.failed ?? 0} failed calls`,
        ),
    );
    const p99Med = medians(p99);
    metrics.push(
      metric({
        id: 'cluster_kill9_p99',
        caseNo,
        title: `p99 encrypt latency (${CALLERS} callers) in a ${fmt(failoverMs / 1000, 1)} s window with one of ${REPLICAS} replicas killed -9 vs a steady window`,
        figure: p99Med.kill,
        figureLabel: 'p99 with a kill -9',
        baseline: p99Med.steady,
        baselineLabel: 'p99 steady',
        unit: 'ms',
        target: 10,
        better: 'lower',
      }),
      metric({
        id: 'cluster_kill9_failed_calls',
        caseNo,
        title: `encrypt calls that failed in the ${ctx.rounds} windows with a replica killed -9, of all calls in them`,
        figure: failover.failed,
        figureLabel: 'failed calls',
        baseline: failover.calls,
        baselineLabel: 'calls',
        unit: 'calls',
        target: 0,
        better: 'lower',
      }),
    );
    details.failover = { samples: p99, windowMs: failoverMs, killed, steady: steadyStats };
    for (const d of replicas) await d.child.stop();
    replicas.length = 0;

    // --- c. KEK rotation of N DEKs: etcd vs LMDB --------------------------------------------
    const rotationDir = ctx.tmp('cluster-rotation-');
    const etcdOptions = {
      dataDir: path.join(rotationDir, 'kms'),
      masterKeyFile,
      registry: etcd.registryUrl,
      cluster: 'bench-rotation',
    };
    const seedKms = await createKms({ ...etcdOptions, audit: false });
    rotationKms.push(seedKms);
    const s0 = performance.now();
    await createKeys(seedKms, deks, 1024, 'bench-thread', (done) =>
      ctx.progress(`  seeding etcd: ${fmt(done)}/${fmt(deks)} DEKs`),
    );
    const etcdSeedSeconds = (performance.now() - s0) / 1000;
    ctx.progress(
      `  seeded ${fmt(deks)} DEKs into etcd in ${fmt(etcdSeedSeconds, 1)} s (${fmt(deks / etcdSeedSeconds)} DEKs/s)`,
    );
    await seedKms.close();
    rotationKms = [];
    const seeded = await seededDir(ctx, deks);
    const onEtcd = await createKms(etcdOptions);
    rotationKms.push(onEtcd);
    const onLmdb = await createKms({ dataDir: seeded.dataDir, masterKeyFile: seeded.masterKeyFile });
    rotationKms.push(onLmdb);
    const raw = await rawEtcd(etcd.clientUrls);
    ctx.progress(
      `  raw etcd: a ${ETCD_ROTATION_BATCH}-put transaction ${fmt(raw.txnMs, 1)} ms, one get ${fmt(raw.getMs, 2)} ms`,
    );
    const rot = await alternate(
      rotationRounds,
      { etcd: () => rotate(onEtcd, deks), lmdb: () => rotate(onLmdb, deks) },
      (r, last) =>
        ctx.progress(
          `  rotation round ${r + 1}/${rotationRounds}: ${fmt(deks)} DEKs on etcd ${fmt(last.etcd)} DEKs/s ` +
            `(${fmt(deks / last.etcd, 1)} s), on LMDB ${fmt(last.lmdb)} DEKs/s (${fmt(deks / last.lmdb, 1)} s)`,
        ),
    );
    const etcdRate = median(rot.etcd);
    const lmdbRate = median(rot.lmdb);
    const label = deks >= 1000 ? `${deks / 1000}k` : String(deks);
    metrics.push(
      metric({
        id: `cluster_rotation_${label}`,
        caseNo,
        title: `KEK rotation of ${fmt(deks)} DEKs on a 3-member etcd vs on LMDB`,
        figure: etcdRate,
        figureLabel: 'etcd DEKs rewrapped/s',
        baseline: lmdbRate,
        baselineLabel: 'LMDB DEKs rewrapped/s',
        unit: '/s',
        target: 0.05,
        better: 'higher',
      }),
    );
    details.rotation = {
      deks,
      samples: rot,
      etcdSeconds: round(deks / etcdRate, 2),
      lmdbSeconds: round(deks / lmdbRate, 2),
      etcdSeedSeconds: round(etcdSeedSeconds, 2),
      lmdbSeedSeconds: round(seeded.seedSeconds, 2),
      rawEtcdTxnMs: round(raw.txnMs, 2),
      rawEtcdGetMs: round(raw.getMs, 3),
    };

    notes.push(
      `throughput: on this ${os.availableParallelism()}-CPU machine the ${REPLICAS} replicas share ` +
        `${os.availableParallelism()} cores with each other, the 3 etcd members and the load generator ` +
        '(the single daemon shares them with the load generator only), so the ratio measures the ' +
        'cost of the cluster, not its scale-out; client given all endpoints, defaults on every daemon',
      `failover: ${fmt(failover.failed)} of ${fmt(failover.calls)} calls failed across ${ctx.rounds} kill -9 ` +
        `windows (target 0); a killed replica was back in ${fmt(median(killed.map((k) => k.restartSeconds ?? 0)), 1)} s (median)`,
      `rotation: ${fmt(deks)} DEKs took ${fmt(deks / etcdRate, 1)} s on etcd, ${fmt(deks / lmdbRate, 1)} s on LMDB ` +
        `(medians). etcd's 128-op transaction limit makes a rotation batch ${ETCD_ROTATION_BATCH} DEK records ` +
        `(one raft commit) against 2,000 per LMDB transaction. A batch took ${fmt((ETCD_ROTATION_BATCH * 1000) / etcdRate, 1)} ms, ` +
        `of which a raw ${ETCD_ROTATION_BATCH}-put transaction takes ${fmt(raw.txnMs, 1)} ms here: batches commit one ` +
        'after another (each carries the cursor and is fenced by the rotation lock), so each pays its ' +
        'page read, the rewrap in a worker and its commit; the group commit checks its reads (guessed ' +
        `from the cache the page read filled) in that one transaction, not by a get each (${fmt(raw.getMs, 2)} ms)`,
    );
    if (quick) {
      notes.push(`quick run: ${fmt(threads)} thread DEKs; rotation of ${fmt(deks)} DEKs, not 100,000`);
    }
    return { metrics, details, notes };
  } finally {
    await Promise.allSettled([...clients].map((c) => c.close()));
    await Promise.allSettled(rotationKms.map((k) => k.close()));
    await Promise.allSettled(replicas.map((d) => d.child.stop()));
    if (single !== null) await single.child.stop();
    await etcd.stop();
  }
}
