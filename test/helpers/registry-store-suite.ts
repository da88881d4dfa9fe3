/**
 * One conformance suite for RegistryStore implementations (src/kms/registry/store.ts): every store
 * (LMDB now, etcd next) runs it through `registryStoreSuite(name, open)`. `open` gives a fresh,
 * empty store for one test and registers its own cleanup.
 */
import test, { type ExecutionContext } from 'ava';
import type { RegistryStore, StoreChange } from '../../src/kms/registry/store.js';

export type OpenStore = (t: ExecutionContext) => Promise<RegistryStore>;

interface Rec {
  keyId: string;
  n: number;
  wrapped: Uint8Array;
}

const rec = (keyId: string, n = 0): Rec => ({ keyId, n, wrapped: Buffer.from(`wrapped-${keyId}-${n}`) });

/** A record as read back, with its bytes as a Buffer whatever view type the store decodes to. */
function plain(value: unknown): unknown {
  if (value === undefined) return undefined;
  const r = value as Rec;
  return { keyId: r.keyId, n: r.n, wrapped: Buffer.from(r.wrapped) };
}

async function withStore(t: ExecutionContext, open: OpenStore): Promise<RegistryStore> {
  const store = await open(t);
  t.teardown(() => store.close());
  return store;
}

/** A rotation record to `target` that has just begun. */
export function runningRotation(target: number, startedAt = 'now') {
  return { state: 'running' as const, target, cursor: null, done: 0, total: 0, startedAt, finishedAt: null };
}

export function registryStoreSuite(name: string, open: OpenStore): void {
  test(`${name}: create-if-absent raced by two transactions commits exactly one`, async (t) => {
    const store = await withStore(t, open);
    const create = (keyId: string) =>
      store.transaction({
        compares: [{ key: 'thread/t1', absent: true }],
        puts: [
          { key: 'thread/t1', value: keyId },
          { key: `dek/${keyId}`, value: rec(keyId) },
        ],
      });
    const [a, b] = await Promise.all([create('dek_a'), create('dek_b')]);
    t.is([a, b].filter((r) => r.committed).length, 1);
    const winner = a.committed ? 'dek_a' : 'dek_b';
    const loser = a.committed ? 'dek_b' : 'dek_a';
    t.is(await store.get('thread/t1'), winner);
    t.deepEqual(plain(await store.get(`dek/${winner}`)), plain(rec(winner)));
    t.is(await store.get(`dek/${loser}`), undefined, 'the losing transaction wrote nothing');
    t.false((await create('dek_c')).committed, 'a later create sees the key present');
  });

  test(`${name}: a value compare commits only while the stored value is unchanged`, async (t) => {
    const store = await withStore(t, open);
    await store.transaction({ puts: [{ key: 'dek/k', value: rec('k', 1) }] });
    const bump = (from: number) =>
      store.transaction({
        compares: [{ key: 'dek/k', equals: rec('k', from) }],
        puts: [{ key: 'dek/k', value: rec('k', from + 1) }],
      });
    t.true((await bump(1)).committed);
    t.false((await bump(1)).committed, 'the value it compared against is gone');
    t.deepEqual(plain(await store.get('dek/k')), plain(rec('k', 2)));
    const peeked = store.peek('dek/k');
    t.true(peeked === undefined || (plain(peeked) as Rec).n === 2, 'peek is never stale after a commit');
  });

  test(`${name}: range pages through one namespace in key order`, async (t) => {
    const store = await withStore(t, open);
    const ids = Array.from({ length: 25 }, (_, i) => `k${String(i).padStart(3, '0')}`);
    await store.transaction({ puts: ids.map((id) => ({ key: `dek/${id}`, value: rec(id) })) });
    await store.transaction({ puts: [{ key: 'thread/x', value: 'k000' }] });
    const seen: string[] = [];
    let after: string | undefined;
    for (;;) {
      const page = await store.range('dek/', { after, limit: 10 });
      if (page.length === 0) break;
      t.true(page.length <= 10);
      for (const { key, value } of page) {
        t.is((value as Rec).keyId, key.slice('dek/'.length));
        seen.push(key);
      }
      after = page.at(-1)!.key;
    }
    t.deepEqual(
      seen,
      ids.map((id) => `dek/${id}`),
    );
    t.is(await store.count('dek/'), 25);
    t.is(await store.count('thread/'), 1);
    t.deepEqual(await store.range('dek/', { after: 'dek/k024' }), []);
  });

  test(`${name}: deletes remove keys from get, range and count`, async (t) => {
    const store = await withStore(t, open);
    await store.transaction({
      puts: ['a', 'b', 'c'].map((id) => ({ key: `dek/${id}`, value: rec(id) })),
    });
    t.true((await store.transaction({ deletes: ['dek/b'] })).committed);
    t.is(await store.get('dek/b'), undefined);
    t.deepEqual(
      (await store.range('dek/')).map((e) => e.key),
      ['dek/a', 'dek/c'],
    );
    t.is(await store.count('dek/'), 2);
    const aborted = await store.transaction({
      compares: [{ key: 'dek/b', equals: rec('b') }],
      deletes: ['dek/a'],
    });
    t.false(aborted.committed);
    t.not(await store.get('dek/a'), undefined, 'a failed compare deletes nothing');
  });

  test(`${name}: watch reports puts and deletes under its prefix until unsubscribed`, async (t) => {
    const store = await withStore(t, open);
    const changes: StoreChange[] = [];
    const unwatch = store.watch('dek/', (change) => changes.push(change));
    await store.transaction({ puts: [{ key: 'dek/w', value: rec('w') }] });
    await store.transaction({ puts: [{ key: 'thread/w', value: 'w' }] });
    await store.atomically((tx) => tx.delete('dek/w'));
    await waitFor(() => changes.length >= 2);
    t.deepEqual(
      changes.map((c) => [c.key, plain(c.value)]),
      [
        ['dek/w', plain(rec('w'))],
        ['dek/w', undefined],
      ],
    );
    unwatch();
    await store.transaction({ puts: [{ key: 'dek/z', value: rec('z') }] });
    // The store's own later change proves the unsubscribed listener was skipped, not just slow.
    const after: StoreChange[] = [];
    store.watch('dek/', (c) => after.push(c));
    await store.transaction({ puts: [{ key: 'dek/y', value: rec('y') }] });
    await waitFor(() => after.some((c) => c.key === 'dek/y'));
    t.is(changes.length, 2);
  });

  test(`${name}: atomically loses no update under concurrent read-modify-writes`, async (t) => {
    const store = await withStore(t, open);
    await store.transaction({ puts: [{ key: 'kek/1', value: { version: 1, refs: 0 } }] });
    const increments = 50;
    await Promise.all(
      Array.from({ length: increments }, (_, i) =>
        store.atomically((tx) => {
          const kek = tx.get('kek/1') as { version: number; refs: number };
          tx.put('kek/1', { ...kek, refs: kek.refs + 1 });
          tx.put(`dek/r${i}`, rec(`r${i}`));
        }),
      ),
    );
    t.is(((await store.get('kek/1')) as { refs: number }).refs, increments);
    t.is(await store.count('dek/'), increments);
    await t.throwsAsync(
      store.atomically((tx) => {
        tx.put('dek/never', rec('never'));
        throw new Error('abort');
      }),
      { message: 'abort' },
    );
    t.is(await store.get('dek/never'), undefined, 'a throw writes nothing');
  });
}

/** Watch events may arrive asynchronously in a cluster store: poll for them, bounded. */
async function waitFor(done: () => boolean, timeoutMs = 5000): Promise<void> {
  const until = Date.now() + timeoutMs;
  // Every few ms, not every tick: a tight loop would keep a core busy that etcd needs.
  while (!done() && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 2));
}
