/**
 * The registry store of a KMS cluster: every replica keeps its registry in one etcd cluster under
 * `<prefix>` (`/progressdb-kms/<cluster>/`), so any replica can serve any key and a replica can die.
 *
 * Reads on the hot path never wait for etcd: `peek` answers from this replica's bounded cache of
 * values, which a linearizable `get` fills on a miss and a watch on the whole prefix keeps fresh.
 * The watch resumes from the last revision it saw after a reconnect (the etcd3 client tracks it);
 * if etcd compacted past that revision the watch is cancelled, and then the cache is dropped and
 * a new watch starts from the current revision, so no stale value outlives the gap.
 *
 * Writes are optimistic transactions: `atomically` runs its function over the values it has read
 * at known mod revisions and commits only if none of them changed, re-running it otherwise (the
 * contract of RegistryStore.atomically); calls made while a commit is in flight share the next
 * one (etcd-group-commit.ts). Create-if-absent is a compare on mod revision 0, so two
 * replicas creating one thread's key race in etcd, and exactly one wins.
 *
 * Values are msgpack (records with byte arrays, as LMDB keeps them); only wrapped key material is
 * ever stored here.
 */
import type { DeleteBuilder, Etcd3, IKeyValue, PutBuilder, SingleRangeBuilder, Watcher } from 'etcd3';
import { Packr } from 'msgpackr';
import { kmsError } from '../../errors.js';
import { GroupCommit, type Read } from './etcd-group-commit.js';
import { MEMBERS, Membership, type MembershipOptions } from './etcd-membership.js';
import { EtcdRekeyVote } from './etcd-rekey.js';
import {
  ChangeListeners,
  type ClusterStatus,
  type RangeOptions,
  type RegistrySnapshot,
  type RegistryStore,
  type StoreChange,
  type StoreCluster,
  type StoreEntry,
  type StoreTransaction,
  type StoreTxnView,
  sameValue,
} from './store.js';

/** Plain maps, not msgpackr's record extension: the bytes stay readable by any msgpack decoder. */
const packr = new Packr({ useRecords: false, moreTypes: false });

/** Values cached per replica, at most; the oldest used go first. */
export const DEFAULT_ETCD_CACHE_ENTRIES = 100_000;

/**
 * KEK versions are numbers and must range in number order; etcd orders keys bytewise, so the
 * store writes them zero-padded (`kek/0000000012`) and reads them back as `kek/12`.
 */
const NUMERIC_NAMESPACES = ['kek/'];
const NUMBER_WIDTH = 10;

function toEtcdKey(key: string): string {
  for (const ns of NUMERIC_NAMESPACES) {
    // A bare namespace (a range's prefix) stays as it is.
    if (key.startsWith(ns) && key.length > ns.length)
      return ns + key.slice(ns.length).padStart(NUMBER_WIDTH, '0');
  }
  return key;
}

function fromEtcdKey(key: string): string {
  for (const ns of NUMERIC_NAMESPACES) {
    if (key.startsWith(ns)) return ns + String(Number(key.slice(ns.length)));
  }
  return key;
}

interface Cached {
  /** undefined for a key deleted at `modRevision` (kept so an older fill cannot bring it back). */
  value: unknown;
  modRevision: bigint;
}

export interface EtcdStoreOptions {
  client: Etcd3;
  /** Key prefix of this KMS cluster, ending in '/'. */
  prefix: string;
  cacheEntries?: number;
  /** Called by close(), after the watch is cancelled: closes a client the store was given to own. */
  onClose?: () => void;
  /** Called when the cache was dropped (the watch fell behind a compaction), for metrics and logs. */
  onCacheDropped?: (reason: string) => void;
  /**
   * Join the cluster as this replica (a lease, a member key: etcd-membership.ts). Without it the
   * store serves with no membership: tools such as migrate, and the store's own tests.
   */
  membership?: MembershipOptions;
}

export class EtcdStore implements RegistryStore {
  readonly #client: Etcd3;
  readonly #prefix: string;
  readonly #cacheEntries: number;
  /** Map order is use order: a hit moves its key to the end, eviction takes the first. */
  readonly #cache = new Map<string, Cached>();
  readonly #listeners = new ChangeListeners();
  readonly #onCacheDropped: ((reason: string) => void) | undefined;
  readonly #onClose: (() => void) | undefined;
  readonly #group = new GroupCommit(
    (key) => this.#read(key),
    (reads, writes) => this.#commit(reads, writes),
    (key) => this.#guess(key),
  );
  #watcher: Watcher | null = null;
  /** The revision the running watch starts after: every later change reaches the cache. */
  #cacheFrom = 0n;
  #closed = false;
  /**
   * Our own commits, already reported to listeners when they committed: key → revision. Their
   * watch events are then not reported again (listeners hear of each change once).
   */
  readonly #reported = new Map<string, bigint>();
  /** The newest revision the watch delivered (it delivers in revision order). */
  #watchedRevision = 0n;
  /** The revision of this store's newest commit. */
  #committedRevision = 0n;
  #membership: Membership | null = null;
  readonly #cacheDroppedListeners = new Set<() => void>();
  cluster?: StoreCluster;

  private constructor(opts: EtcdStoreOptions) {
    this.#client = opts.client;
    this.#prefix = opts.prefix;
    this.#cacheEntries = opts.cacheEntries ?? DEFAULT_ETCD_CACHE_ENTRIES;
    this.#onCacheDropped = opts.onCacheDropped;
    this.#onClose = opts.onClose;
  }

  /** Connects (one linearizable read) and starts the prefix watch before answering anything. */
  static async open(opts: EtcdStoreOptions): Promise<EtcdStore> {
    if (!opts.prefix.endsWith('/')) throw new Error('the etcd prefix must end in "/"');
    const store = new EtcdStore(opts);
    try {
      const revision = await store.#currentRevision();
      store.#watchedRevision = revision;
      await store.#watch(revision + 1n);
      if (opts.membership !== undefined) await store.#join(opts.membership);
    } catch (err) {
      // The caller still owns the client (onClose is not called): it closes it.
      await store.#shutdown();
      throw (err as { code?: string }).code === undefined ? unavailable(err) : err;
    }
    return store;
  }

  async #join(opts: MembershipOptions): Promise<void> {
    const host = {
      client: this.#client,
      etcdKey: (key: string) => this.#etcdKey(key),
      encode,
      appliedRevision: () => this.#watchedRevision,
      watch: (prefix: string, onChange: (change: StoreChange) => void) =>
        this.#listeners.add(prefix, onChange),
      range: (prefix: string) => this.range(prefix),
    };
    const membership = await Membership.join(host, opts);
    this.#membership = membership;
    const rekey = new EtcdRekeyVote({
      ...host,
      decode,
      replicaId: membership.replicaId,
      leaseId: () => membership.leaseId,
      membersPrefix: MEMBERS,
    });
    this.cluster = {
      rekey,
      replicaId: membership.replicaId,
      assertServing: () => membership.assertServing(),
      status: (): ClusterStatus => membership.status(),
      confirmApplied: () => membership.confirmApplied(),
      compactHistory: () => membership.compact(this.#committedRevision),
      lockKey: (name) => membership.lockKey(name),
      holds: (value) => membership.holds(value),
      tryLock: (name) => membership.tryLock(name),
      unlock: (name) => membership.unlock(name),
      onUnlocked: (name, onReleased) => membership.onUnlocked(name, onReleased),
      onCacheDropped: (onDropped) => {
        this.#cacheDroppedListeners.add(onDropped);
        return () => this.#cacheDroppedListeners.delete(onDropped);
      },
    };
  }

  async #currentRevision(): Promise<bigint> {
    const res = await this.#client.get(`${this.#prefix}\0`).exec();
    return BigInt(res.header.revision);
  }

  async #watch(fromRevision: bigint): Promise<void> {
    this.#cacheFrom = fromRevision - 1n;
    const watcher = await this.#client
      .watch()
      .prefix(this.#prefix)
      .startRevision(fromRevision.toString())
      .create();
    watcher.on('put', (kv) => this.#applyWatched(kv, false));
    watcher.on('delete', (kv) => this.#applyWatched(kv, true));
    watcher.on('error', (err) => void this.#restartWatch(err));
    this.#watcher = watcher;
  }

  /** The watch was cancelled (compacted past our revision): what the cache holds may be stale. */
  async #restartWatch(err: Error): Promise<void> {
    this.#cache.clear();
    this.#reported.clear();
    this.#onCacheDropped?.(err.message);
    this.#watcher = null;
    for (const onDropped of this.#cacheDroppedListeners) onDropped();
    while (!this.#closed) {
      try {
        const revision = await this.#currentRevision();
        // Nothing older than this is held any more (the cache is empty): this replica has applied it.
        if (revision > this.#watchedRevision) this.#watchedRevision = revision;
        await this.#watch(revision + 1n);
        // Reads made while no watch ran may have been cached above us (the registry's record
        // cache) at a revision before `revision`, and a change between the two is never heard:
        // those go now that the watch covers every change after `revision`.
        for (const onDropped of this.#cacheDroppedListeners) onDropped();
        this.#membership?.cacheDropped();
        return;
      } catch {
        // etcd unreachable: keep the cache empty (every read goes to etcd) and try again.
        await new Promise((resolve) => setTimeout(resolve, 500).unref());
      }
    }
  }

  #applyWatched(kv: IKeyValue, deleted: boolean): void {
    const key = fromEtcdKey(kv.key.toString().slice(this.#prefix.length));
    const modRevision = BigInt(kv.mod_revision);
    if (modRevision > this.#watchedRevision) this.#watchedRevision = modRevision;
    const value = deleted ? undefined : decode(kv.value);
    this.#remember(key, value, modRevision, modRevision);
    if (this.#reported.get(key) === modRevision) {
      this.#reported.delete(key);
      return;
    }
    this.#listeners.emit([{ key, value }]);
  }

  /**
   * Caches what a read, a commit or the watch saw (at revision `seenAt`), unless something newer
   * is cached already. Only while the watch runs, and only what was seen at or after the revision
   * it starts after: a value seen earlier may have changed meanwhile, unheard.
   */
  #remember(key: string, value: unknown, modRevision: bigint, seenAt: bigint): void {
    if (this.#watcher === null || seenAt < this.#cacheFrom) return;
    const cached = this.#cache.get(key);
    if (cached !== undefined && cached.modRevision >= modRevision) return;
    this.#cache.delete(key);
    this.#cache.set(key, { value, modRevision });
    if (this.#cache.size > this.#cacheEntries) {
      const oldest = this.#cache.keys().next();
      if (!oldest.done) this.#cache.delete(oldest.value);
    }
  }

  peek(key: string): unknown {
    const cached = this.#cache.get(key);
    if (cached === undefined) return undefined;
    this.#cache.delete(key);
    this.#cache.set(key, cached);
    return cached.value;
  }

  async get(key: string): Promise<unknown> {
    return (await this.#read(key)).value;
  }

  /**
   * What the cache says of `key` without a round trip, else absent (a create's new keys are not
   * cached, and are absent). The watch keeps the cache current, so guesses are mostly right; the
   * group commit's compares check every one.
   */
  #guess(key: string): Read {
    const cached = this.#cache.get(key);
    // A cached delete is absent: etcd compares an absent key's mod revision as 0.
    if (cached === undefined || cached.value === undefined)
      return { value: undefined, modRevision: 0n, guessed: true };
    return { value: cached.value, modRevision: cached.modRevision, guessed: true };
  }

  /** A linearizable read of one key (etcd's default), remembered in the cache. */
  async #read(key: string): Promise<Read> {
    let res: Awaited<ReturnType<ReturnType<Etcd3['get']>['exec']>>;
    try {
      res = await this.#client.get(this.#etcdKey(key)).exec();
    } catch (err) {
      throw unavailable(err);
    }
    const kv = res.kvs[0];
    if (kv === undefined) return { value: undefined, modRevision: 0n };
    const read = { value: decode(kv.value), modRevision: BigInt(kv.mod_revision) };
    this.#remember(key, read.value, read.modRevision, BigInt(res.header.revision));
    return read;
  }

  #etcdKey(key: string): string {
    return this.#prefix + toEtcdKey(key);
  }

  async range(prefix: string, options: RangeOptions = {}): Promise<StoreEntry[]> {
    return this.#range(prefix, options, undefined);
  }

  /**
   * The registry as of the current revision: every read names that revision, so what commits
   * meanwhile is not seen (a read fails once etcd compacts past it: REGISTRY_UNAVAILABLE).
   */
  async snapshot(): Promise<RegistrySnapshot> {
    let revision: string;
    try {
      revision = (await this.#currentRevision()).toString();
    } catch (err) {
      throw unavailable(err);
    }
    return {
      revision,
      get: async (key) => {
        try {
          const res = await this.#client.get(this.#etcdKey(key)).revision(revision).exec();
          const kv = res.kvs[0];
          return kv === undefined ? undefined : decode(kv.value);
        } catch (err) {
          throw unavailable(err);
        }
      },
      count: (prefix) => this.#count(prefix, revision),
      range: (prefix, options) => this.#range(prefix, options ?? {}, revision),
      close: async () => {},
    };
  }

  /** A page of a namespace, at `revision` when given (then not cached: it may be old). */
  async #range(prefix: string, options: RangeOptions, revision: string | undefined): Promise<StoreEntry[]> {
    const from = options.after === undefined ? this.#etcdKey(prefix) : `${this.#etcdKey(options.after)}\0`;
    const end = prefixEnd(this.#etcdKey(prefix));
    try {
      // No explicit sort: etcd returns a range in key order already, and a sorted range makes
      // etcd 3.4 read the whole rest of the range before applying the limit (each page O(n)).
      let builder = this.#client.getAll().inRange({ start: from, end });
      if (options.limit !== undefined) builder = builder.limit(options.limit);
      if (revision !== undefined) builder = builder.revision(revision);
      const res = await builder.exec();
      const seenAt = BigInt(res.header.revision);
      return res.kvs.map((kv) => {
        const key = fromEtcdKey(kv.key.toString().slice(this.#prefix.length));
        const value = decode(kv.value);
        // So that a batch over what was just listed (a rotation's page) guesses right.
        if (revision === undefined) this.#remember(key, value, BigInt(kv.mod_revision), seenAt);
        return { key, value };
      });
    } catch (err) {
      throw unavailable(err);
    }
  }

  count(prefix: string): Promise<number> {
    return this.#count(prefix, undefined);
  }

  async #count(prefix: string, revision: string | undefined): Promise<number> {
    try {
      const builder = this.#client.getAll().prefix(this.#etcdKey(prefix));
      return await (revision === undefined ? builder : builder.revision(revision)).count();
    } catch (err) {
      throw unavailable(err);
    }
  }

  async transaction(txn: StoreTransaction): Promise<{ committed: boolean }> {
    return this.atomically((tx) => {
      for (const c of txn.compares ?? []) {
        const value = tx.get(c.key);
        if ('absent' in c ? value !== undefined : !sameValue(value, c.equals)) return { committed: false };
      }
      for (const { key, value } of txn.puts ?? []) tx.put(key, value);
      for (const key of txn.deletes ?? []) tx.delete(key);
      return { committed: true };
    });
  }

  atomically<T>(fn: (tx: StoreTxnView) => T): Promise<T> {
    return this.#group.run(fn);
  }

  async #commit(reads: Map<string, Read>, writes: Map<string, unknown>): Promise<boolean> {
    // Each key read is unchanged since (mod revision 0: still absent). A blind write compares a
    // condition that always holds, because an etcd3 transaction starts from a compare.
    const compares: [string, string][] = [...reads].map(([key, read]) => [key, read.modRevision.toString()]);
    const [first, ...rest] = compares;
    let txn = first
      ? this.#client.if(this.#etcdKey(first[0]), 'Mod', '==', first[1])
      : this.#client.if(this.#etcdKey([...writes.keys()][0] as string), 'Version', '>', -1);
    for (const [key, revision] of rest) txn = txn.and(this.#etcdKey(key), 'Mod', '==', revision);
    const ops: (PutBuilder | DeleteBuilder | SingleRangeBuilder)[] = [...writes].map(([key, value]) =>
      value === undefined
        ? this.#client.delete().key(this.#etcdKey(key))
        : this.#client.put(this.#etcdKey(key)).value(encode(value)),
    );
    // etcd 3.4 answers a transaction without operations from the member's own state, like a
    // serializable read, so it can be stale and miss a write just made through another member.
    // One (linearizable) read in it makes etcd serve it only once that member has caught up.
    if (first !== undefined && ops.length === 0) ops.push(this.#client.get(this.#etcdKey(first[0])));
    let res: Awaited<ReturnType<typeof txn.commit>>;
    try {
      res = await txn.then(...ops).commit();
    } catch (err) {
      throw unavailable(err);
    }
    if (!res.succeeded) return false;
    // A batch of guessed reads and no writes commits its compares only: nothing changed.
    if (writes.size === 0) return true;
    const revision = BigInt(res.header.revision);
    if (revision > this.#committedRevision) this.#committedRevision = revision;
    for (const [key, value] of writes) this.#remember(key, value, revision, revision);
    // Listeners hear of our own commits at once, as LMDB's do, unless the watch was quicker than
    // the commit's answer; the watch's copy of a change already reported is then skipped.
    if (revision <= this.#watchedRevision) return true;
    const changes: StoreChange[] = [];
    for (const [key, value] of writes) {
      this.#reported.set(key, revision);
      changes.push({ key, value });
    }
    this.#listeners.emit(changes);
    return true;
  }

  putNow(key: string, value: unknown): void {
    if (this.#closed) throw kmsError('NOT_READY', 'the registry is closed');
    // The audit head: best effort between commits, like LMDB's joined write; a failure is seen
    // by the next write, which goes through a transaction.
    this.#client
      .put(this.#etcdKey(key))
      .value(encode(value))
      .exec()
      .then(
        (res) => {
          const revision = BigInt(res.header.revision);
          this.#remember(key, value, revision, revision);
        },
        () => undefined,
      );
  }

  watch(prefix: string, onChange: (change: StoreChange) => void): () => void {
    return this.#listeners.add(prefix, onChange);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    await this.#shutdown();
    this.#onClose?.();
  }

  /** Leaves the cluster (its lease revoked: member key and locks gone at once), stops the watch. */
  async #shutdown(): Promise<void> {
    this.#closed = true;
    await this.#membership?.leave();
    await this.#watcher?.cancel().catch(() => undefined);
    this.#watcher = null;
    this.#cache.clear();
  }
}

function encode(value: unknown): Buffer {
  return packr.pack(value);
}

function decode(bytes: Buffer): unknown {
  return packr.unpack(bytes);
}

/** The first key after every key that starts with `prefix`. */
function prefixEnd(prefix: string): Buffer {
  const end = Buffer.from(prefix);
  end[end.length - 1] = (end[end.length - 1] as number) + 1;
  return end;
}

function unavailable(err: unknown): Error {
  const message = err instanceof Error ? err.message : String(err);
  return kmsError('REGISTRY_UNAVAILABLE', `the etcd registry is unavailable (${message})`);
}
