/**
 * The storage interface under the registry: string keys, record values, atomic transactions.
 * `LmdbStore` (lmdb.ts) serves one node from its data directory; a cluster store (etcd) is the
 * second implementation. The registry (index.ts) holds the typed records over it.
 *
 * Keys live in a few namespaces: `kek/<version>`, `dek/<keyId>`, `thread/<threadId>` (the thread
 * index), `pending/<due>/<keyId>` (keys pending deletion, registry/index.ts), and single keys `meta/kek`, `meta/format`, `meta/kcv`, `rotation`, `audit-head`
 * (names in keys.ts). A cluster store also holds its members, locks and the master re-key vote
 * (`rekey/record`, `rekey/answer/<replicaId>`: etcd-rekey.ts).
 * Values are records (plain objects, strings, numbers, byte arrays) that the store encodes itself,
 * so each store keeps its own format (LMDB: exactly the file it always wrote).
 *
 * Only wrapped key material ever passes through a store.
 */

import type { ReplicaStatus } from '../../api/index.js';
import type { MasterKeyRef } from '../../worker-abi/index.js';

export interface StoreEntry {
  key: string;
  value: unknown;
}

/** A condition a transaction commits under. */
export type StoreCompare =
  /** The key holds no value. */
  | { key: string; absent: true }
  /** The key holds a value equal (field by field, bytes by content) to `equals`. */
  | { key: string; equals: unknown };

export interface StoreTransaction {
  compares?: readonly StoreCompare[];
  puts?: readonly StoreEntry[];
  deletes?: readonly string[];
}

/** A committed write: `value` undefined for a delete. */
export interface StoreChange {
  key: string;
  value: unknown;
}

/** What `atomically` hands its function: reads see the function's own earlier writes. */
export interface StoreTxnView {
  get(key: string): unknown;
  put(key: string, value: unknown): void;
  delete(key: string): void;
}

export interface RangeOptions {
  /** Start after this key (exclusive); from the start of the namespace when absent. */
  after?: string;
  limit?: number;
}

/**
 * A read-only view of a whole registry as of one moment (backup.ts): LMDB reads in one read
 * transaction, etcd at one revision, so records written meanwhile are never half seen.
 */
export interface RegistrySnapshot {
  /** The etcd revision read at; absent for LMDB. */
  readonly revision?: string;
  get(key: string): Promise<unknown>;
  count(prefix: string): Promise<number>;
  range(prefix: string, options?: RangeOptions): Promise<StoreEntry[]>;
  close(): Promise<void>;
}

/** The state of this process in a cluster store, for health and metrics. */
export type ClusterStatus = ReplicaStatus;

/**
 * What a store that several KMS processes share (etcd) adds: this process's membership, with the
 * guarantees built on it (etcd-membership.ts).
 */
export interface StoreCluster {
  readonly replicaId: string;
  /** Throws REGISTRY_UNAVAILABLE unless this process may serve from what it has cached. */
  assertServing(): void;
  status(): ClusterStatus;
  /** Resolves once no live process can still act on a state older than this process's commits. */
  confirmApplied(): Promise<void>;
  /** Compacts the store's history up to this process's last commit, once every process has applied it; returns that revision. */
  compactHistory(): Promise<string>;
  /** The key of lock `name`: a transaction that reads it and checks `holds` is fenced by it. */
  lockKey(name: string): string;
  /** Whether a lock key's value says this process holds the lock now. */
  holds(value: unknown): boolean;
  tryLock(name: string): Promise<boolean>;
  unlock(name: string): Promise<void>;
  /** Calls `onReleased` when lock `name` is released or its holder's lease lapses. */
  onUnlocked(name: string, onReleased: () => void): () => void;
  /** Calls `onDropped` when the store dropped its cache (it fell behind etcd's compaction). */
  onCacheDropped(onDropped: () => void): () => void;
  /** The replicas' vote on a master re-key (src/kms/cluster-rekey.ts). */
  readonly rekey: ClusterRekeyVote;
}

/**
 * A master re-key of a cluster, as its store records it (`rekey`): proposed under the proposing
 * process's lease, so that it lapses with that process, then committed in the transaction that
 * rewraps the KEKs (kept, without a lease, so that a replica that missed the moment still finds it).
 */
export interface RekeyRecord {
  id: string;
  /** The proposing process's replica id. */
  by: string;
  state: 'proposed' | 'committed';
  /** The new master key: a key file every replica reads at this same path. */
  target: MasterKeyRef;
  /** Key check values of the new and the current master key. */
  kcv: Uint8Array;
  fromKcv: Uint8Array;
  proposedAt: string;
  committedAt?: string;
}

/**
 * How the processes of a cluster agree on a master re-key before it commits. Every live process
 * must answer yes (it reads the new key at the record's path, its check value matches, and its
 * workers now accept both keys) before the KEKs are rewrapped: no process is ever left holding
 * only a master key that no longer opens the registry.
 */
export interface ClusterRekeyVote {
  /** The store key of the record, read in the commit's transaction (fencing). */
  readonly key: string;
  /** The record, read linearizably. */
  read(): Promise<RekeyRecord | undefined>;
  /** Writes `record` under this process's lease; CONFLICT when another re-key is pending. */
  propose(record: RekeyRecord): Promise<void>;
  /** Deletes the proposal `id` if it is still pending. */
  withdraw(id: string): Promise<void>;
  /** This process's answer to proposal `id`: yes, or the reason it refuses. */
  answer(id: string, refusal?: string): Promise<void>;
  /**
   * Resolves once every other live process has answered yes to `id`; REKEY_REFUSED at the first
   * refusal, REGISTRY_UNAVAILABLE naming the silent ones after `timeoutMs`.
   */
  awaitAnswers(id: string, timeoutMs: number): Promise<void>;
  /** Calls `onChange` with each new state of the record (undefined once deleted or lapsed). */
  onRecord(onChange: (record: RekeyRecord | undefined) => void): () => void;
}

export interface RegistryStore {
  /** Present when several processes share this store (a cluster): see StoreCluster. */
  readonly cluster?: StoreCluster;
  /** The value of `key`, read from the authoritative copy (linearizable in a cluster). */
  get(key: string): Promise<unknown>;
  /**
   * The value of `key` if it is known locally, at once. `undefined` means "not known here: call
   * get" (LMDB reads its file, so it also means absent; a cluster store answers from its cache).
   * A store without `cluster` must be of the first kind: creates trust its absent.
   */
  peek(key: string): unknown;
  /** Entries of one namespace (`prefix` ends in `/`) in its key order, paged by `after`. */
  range(prefix: string, options?: RangeOptions): Promise<StoreEntry[]>;
  /** How many keys one namespace holds. */
  count(prefix: string): Promise<number>;
  /** Applies every put and delete if every compare holds, else nothing. */
  transaction(txn: StoreTransaction): Promise<{ committed: boolean }>;
  /**
   * Read-modify-write: runs `fn` and commits its writes atomically, as if nothing else ran
   * between its reads and the commit. A store may run `fn` more than once (an optimistic store
   * re-runs it when a key it read changed before the commit), so `fn` acts only through `tx`
   * and through effects that a re-run overwrites; a throw aborts and writes nothing.
   */
  atomically<T>(fn: (tx: StoreTxnView) => T): Promise<T>;
  /**
   * Stores one value without making the caller wait (the audit head, the KCV). LMDB commits it
   * synchronously when none of its own writes is in flight (a failure throws here) and otherwise
   * joins them, so the main thread never waits for their write lock.
   */
  putNow(key: string, value: unknown): void;
  /**
   * Calls `onChange` after each committed change under `prefix`, to invalidate caches. LMDB sees
   * only its own writes (one process owns a data directory, so that is every write); a cluster
   * store watches the prefix. Returns the unsubscribe function.
   */
  watch(prefix: string, onChange: (change: StoreChange) => void): () => void;
  close(): Promise<void>;
}

/** Whether two decoded records are equal: same fields, byte arrays by content. */
export function sameValue(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (ArrayBuffer.isView(a) || ArrayBuffer.isView(b)) {
    if (!(ArrayBuffer.isView(a) && ArrayBuffer.isView(b))) return false;
    return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(
      Buffer.from(b.buffer, b.byteOffset, b.byteLength),
    );
  }
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const aKeys = Object.keys(a);
  if (aKeys.length !== Object.keys(b).length) return false;
  return aKeys.every((k) => sameValue((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]));
}

/** Listeners by prefix, for a store that raises its own change events. */
export class ChangeListeners {
  readonly #listeners = new Set<{ prefix: string; onChange: (change: StoreChange) => void }>();

  add(prefix: string, onChange: (change: StoreChange) => void): () => void {
    const listener = { prefix, onChange };
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  emit(changes: Iterable<StoreChange>): void {
    if (this.#listeners.size === 0) return;
    for (const change of changes) {
      for (const { prefix, onChange } of this.#listeners) {
        if (change.key.startsWith(prefix)) onChange(change);
      }
    }
  }
}
