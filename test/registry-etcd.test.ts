/**
 * The etcd registry store against real etcd members: what only a cluster store must do beyond the
 * store conformance suite. Replicas see each other's writes through the watch, the hot path
 * answers from the cache while etcd is away, a watch that fell behind a compaction drops the
 * cache instead of serving stale values, and KEK versions range in number order.
 */
import path from 'node:path';
import test from 'ava';
import { Etcd3 } from 'etcd3';
import { createKms } from '../src/kms/index.js';
import { EtcdStore } from '../src/kms/registry/etcd.js';
import { Registry } from '../src/kms/registry/index.js';
import { etcdFaultHandling } from '../src/kms/registry/open.js';
import { EtcdCluster } from './helpers/etcd.js';
import { auditLines, manualClock, tempDir, writeMasterKey } from './helpers/kms.js';
import { until } from './helpers/processes.js';
import { registryStoreSuite, runningRotation } from './helpers/registry-store-suite.js';

let cluster: EtcdCluster;
let prefixes = 0;
const clients: Etcd3[] = [];

test.before(async () => {
  cluster = await EtcdCluster.start(3);
});

test.after.always(async () => {
  for (const c of clients) c.close();
  await cluster?.stop();
});

/** A client of the given members (default all), closed at the end. */
function client(members: number[] = [0, 1, 2]): Etcd3 {
  const c = new Etcd3({
    hosts: members.map((i) => cluster.clientUrls[i] as string),
    faultHandling: etcdFaultHandling(),
  });
  clients.push(c);
  return c;
}

// The conformance suite every store passes; each test gets its own cluster prefix. (Concurrent
// tests run after the serial ones below, so no member is down while it runs.)
registryStoreSuite('etcd', async () =>
  EtcdStore.open({ client: client(), prefix: `/progressdb-kms/suite-${++prefixes}/` }),
);

/** Two stores of one fresh cluster prefix, as two replicas would open it. */
async function replicas(
  members: [number[], number[]] = [
    [0, 1, 2],
    [0, 1, 2],
  ],
) {
  const prefix = `/progressdb-kms/test-${++prefixes}/`;
  const dropped: string[] = [];
  const a = await EtcdStore.open({
    client: client(members[0]),
    prefix,
    onCacheDropped: (r) => dropped.push(r),
  });
  const b = await EtcdStore.open({
    client: client(members[1]),
    prefix,
    onCacheDropped: (r) => dropped.push(r),
  });
  return { a, b, prefix, dropped };
}

test.serial('a write on one replica reaches the other replica through the watch', async (t) => {
  const { a, b } = await replicas();
  const heard: string[] = [];
  b.watch('dek/', (change) => heard.push(`${change.key}:${change.value === undefined ? 'deleted' : 'put'}`));
  t.is(b.peek('dek/k1'), undefined, 'nothing cached before a read');
  await a.transaction({ puts: [{ key: 'dek/k1', value: { version: 1 } }] });
  await until('b hears the put', () => (heard.includes('dek/k1:put') ? true : undefined), 5000);
  t.deepEqual(b.peek('dek/k1'), { version: 1 });
  await a.transaction({ deletes: ['dek/k1'] });
  await until('b hears the delete', () => (heard.includes('dek/k1:deleted') ? true : undefined), 5000);
  t.is(b.peek('dek/k1'), undefined, 'a deleted key is not served from the cache');
  t.is(await b.get('dek/k1'), undefined);
  await a.close();
  await b.close();
});

test.serial('create-if-absent raced from two replicas: exactly one wins, both read the winner', async (t) => {
  const { a, b } = await replicas();
  for (let i = 0; i < 20; i++) {
    const key = `thread/t${i}`;
    const results = await Promise.all(
      [a, b].map((store, n) =>
        store.transaction({ compares: [{ key, absent: true }], puts: [{ key, value: `key-from-${n}` }] }),
      ),
    );
    t.is(results.filter((r) => r.committed).length, 1, key);
    const winner = await a.get(key);
    t.is(await b.get(key), winner);
  }
  await a.close();
  await b.close();
});

test.serial(
  'a batch guesses from its cache, and etcd checks each guess: a write elsewhere just before is never missed',
  async (t) => {
    const { a, b } = await replicas();
    for (let i = 0; i < 40; i++) {
      const key = `dek/g${i}`;
      // Never seen by A (guessed absent), then one A wrote itself (cached), each overwritten by B
      // just before A reads it, likely before A's watch has heard of it.
      if (i % 2 === 1) await a.transaction({ puts: [{ key, value: { by: 'a' } }] });
      await b.transaction({ puts: [{ key, value: { by: 'b', i } }] });
      t.deepEqual(await a.atomically((tx) => tx.get(key)), { by: 'b', i }, `read-only ${key}`);
      await b.transaction({ puts: [{ key, value: { by: 'b', i, again: true } }] });
      const seen = await a.atomically((tx) => {
        const value = tx.get(key);
        tx.put(key, { by: 'a', after: value });
        return value;
      });
      t.deepEqual(seen, { by: 'b', i, again: true }, `read-modify-write ${key}`);
    }
    await a.close();
    await b.close();
  },
);

test.serial('read-modify-write from two replicas loses no update', async (t) => {
  const { a, b } = await replicas();
  await Promise.all(
    Array.from({ length: 30 }, (_, i) =>
      (i % 2 === 0 ? a : b).atomically((tx) => {
        tx.put('refs', ((tx.get('refs') as number | undefined) ?? 0) + 1);
      }),
    ),
  );
  t.is(await a.get('refs'), 30);
  await a.close();
  await b.close();
});

test.serial(
  'hundreds of concurrent creates on two replicas all commit, sharing one counter, and a failing one writes nothing',
  async (t) => {
    const { a, b } = await replicas();
    await a.transaction({ puts: [{ key: 'kek/1', value: { refs: 0 } }] });
    const create = (i: number) =>
      (i % 2 === 0 ? a : b).atomically((tx) => {
        if (i === 7) throw new Error('refused by its own check');
        const kek = tx.get('kek/1') as { refs: number };
        tx.put('kek/1', { refs: kek.refs + 1 });
        tx.put(`thread/t${i}`, `k${i}`);
        tx.put(`dek/k${i}`, { keyId: `k${i}` });
        return i;
      });
    const results = await Promise.allSettled(Array.from({ length: 400 }, (_, i) => create(i)));
    t.deepEqual(
      results.filter((r) => r.status === 'rejected').map((r) => (r as PromiseRejectedResult).reason.message),
      ['refused by its own check'],
    );
    t.deepEqual(await b.get('kek/1'), { refs: 399 });
    t.is(await a.count('thread/'), 399);
    t.is(await a.get('thread/t7'), undefined);
    await a.close();
    await b.close();
  },
);

test.serial(
  'two replicas starting a KEK rotation at once: one new KEK version, the other refused',
  async (t) => {
    const { a, b } = await replicas();
    const [ra, rb] = await Promise.all([Registry.open(a), Registry.open(b)]);
    const kek = (version: number, wrapped: number) => ({
      kekId: 'kek_1',
      version,
      wrapped: Buffer.alloc(60, wrapped),
      createdAt: 'now',
      refs: 0,
    });
    t.true(
      await ra.initKek({ kekId: 'kek_1', activeVersion: 1, createdAt: 'now' }, kek(1, 1), Buffer.alloc(16)),
    );
    t.false(
      await rb.initKek({ kekId: 'kek_1', activeVersion: 1, createdAt: 'now' }, kek(1, 9), Buffer.alloc(16)),
    );
    await until('b sees KEK version 1', () => rb.kekMeta(), 5000);
    const rotation = runningRotation(2);
    const results = await Promise.allSettled([
      ra.beginRotation(kek(2, 2), rotation, Buffer.alloc(16)),
      rb.beginRotation(kek(2, 3), rotation, Buffer.alloc(16)),
    ]);
    const refused = results.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
    t.is(refused.length, 1);
    t.is(refused[0]?.reason.code, 'ROTATION_IN_PROGRESS');
    const winner = results[0]?.status === 'fulfilled' ? 2 : 3;
    t.deepEqual((await a.get('kek/2')) as unknown, kek(2, winner), 'the first KEK version 2 stays as it was');
    await ra.close();
    await rb.close();
  },
);

test.serial('KEK versions range in number order, paged', async (t) => {
  const { a, b } = await replicas();
  for (const v of [1, 2, 10, 3, 100]) await a.transaction({ puts: [{ key: `kek/${v}`, value: { v } }] });
  t.deepEqual(
    (await b.range('kek/')).map((e) => e.key),
    ['kek/1', 'kek/2', 'kek/3', 'kek/10', 'kek/100'],
  );
  t.deepEqual(
    (await b.range('kek/', { after: 'kek/3', limit: 1 })).map((e) => e.key),
    ['kek/10'],
  );
  t.is(await b.count('kek/'), 5);
  await a.close();
  await b.close();
});

test.serial(
  'with its etcd member gone, a replica still serves what it has cached; reads of the rest fail as unavailable',
  async (t) => {
    // b talks to member 2 only; killing it leaves b without etcd while the cluster goes on.
    const { a, b } = await replicas([[0, 1], [2]]);
    await a.transaction({ puts: [{ key: 'dek/hot', value: { wrapped: Buffer.from('wrapped bytes') } }] });
    await b.get('dek/hot');
    await cluster.kill(2);
    try {
      t.deepEqual(b.peek('dek/hot'), { wrapped: Buffer.from('wrapped bytes') });
      const err = await t.throwsAsync(b.get('dek/cold'));
      t.is((err as { code?: string }).code, 'REGISTRY_UNAVAILABLE');
    } finally {
      await cluster.restart(2);
    }
    await a.close();
    await b.close();
  },
);

test.serial('a watch that fell behind a compaction drops the cache and watches again', async (t) => {
  const { a, b, dropped } = await replicas([[0, 1], [2]]);
  // Closed however the test ends: open stores would keep ava from exiting.
  t.teardown(async () => {
    await a.close();
    await b.close();
  });
  await a.transaction({ puts: [{ key: 'dek/k', value: { version: 1 } }] });
  await b.get('dek/k');
  await cluster.kill(2);
  // While b is cut off: a new version, and history compacted past what b's watch has seen.
  // Two writes: a watch resumes at the revision after its last, so compacting at the latest
  // leaves that revision out of reach only when more than one write happened meanwhile.
  await a.transaction({ puts: [{ key: 'dek/k', value: { version: 2 } }] });
  await a.transaction({ puts: [{ key: 'dek/other', value: { version: 1 } }] });
  const admin = client([0, 1]);
  const head = await admin.get('/').exec();
  await admin.kv.compact({ revision: head.header.revision, physical: true });
  await cluster.restart(2);
  await until('b drops its cache', () => (dropped.length > 0 ? true : undefined), 15_000);
  t.is(b.peek('dek/k'), undefined, 'the stale version 1 is not served');
  t.deepEqual(await b.get('dek/k'), { version: 2 });
  // The new watch works: a later write reaches b without a read. b drops its cache before it
  // watches again, from the revision it reads then: a write made before that is not heard (nor
  // cached, as b has not read it), so a new version is written every half second until one is.
  let version = 2;
  let probes = 0;
  await until(
    'b hears a write made after its new watch began',
    async () => {
      if (((b.peek('dek/k') as { version?: number } | undefined)?.version ?? 0) > 2) return true;
      if (probes++ % 25 === 0)
        await a.transaction({ puts: [{ key: 'dek/k', value: { version: ++version } }] });
      return undefined;
    },
    10_000,
  );
  t.pass();
});

test('a deletion window in a cluster: pending on every replica at once, destroyed once when it ends', async (t) => {
  const dir = tempDir(t, 'pdb-etcd-window-');
  const { file } = writeMasterKey(dir);
  const clock = manualClock();
  const replica = async (name: string) => {
    const kms = await createKms({
      dataDir: path.join(dir, name),
      masterKeyFile: file,
      poolSize: 1,
      registry: cluster.registryUrl,
      cluster: 'deletion-window',
      replicaId: name,
      deletionWindow: '1d',
      clock,
    });
    t.teardown(() => kms.close());
    return kms;
  };
  const a = await replica('a');
  const b = await replica('b');
  const dek = await a.createDekForThread('clustered');
  const sealed = await a.encrypt(dek.keyId, Buffer.from('clustered'));
  t.is((await b.decrypt(dek.keyId, sealed.ciphertext)).toString(), 'clustered');
  await a.destroyDek(dek.keyId);
  // destroyDek answers once every live replica has applied it.
  await t.throwsAsync(b.decrypt(dek.keyId, sealed.ciphertext), { code: 'KEY_PENDING_DELETION' });
  t.like(await b.cancelDeletion(dek.keyId), { keyId: dek.keyId });
  t.is((await a.decrypt(dek.keyId, sealed.ciphertext)).toString(), 'clustered');
  await b.destroyDek(dek.keyId);
  clock.advance(2 * 86_400_000);
  for (const kms of [a, b]) {
    await until(
      'the destruction',
      async () => ((await kms.health()).dekCount === 0 ? true : undefined),
      15_000,
    );
  }
  await t.throwsAsync(a.decrypt(dek.keyId, sealed.ciphertext), { code: 'KEY_NOT_FOUND' });
  const destructions = ['a', 'b'].flatMap((name) =>
    auditLines(path.join(dir, name)).filter((l) => l.caller === 'kms-deletion-window'),
  );
  t.is(destructions.length, 1, 'one replica destroyed it; the other found nothing to do');
  t.like(destructions[0], { op: 'destroy_dek', key_id: dek.keyId, detail: 'destroyed [1]' });
});
