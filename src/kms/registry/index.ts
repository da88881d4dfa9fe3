/**
 * The KMS registry: KEK versions (wrapped under the master key), DEK records (each version
 * wrapped under a KEK version), the thread → key index and KEK rotation progress, as typed
 * records over a RegistryStore (store.ts; LMDB in lmdb.ts). Holds wrapped material only.
 *
 * Every change that touches which KEK version wraps which DEK version also updates that KEK
 * version's reference count in the same transaction, so "is this KEK version still needed?" is a
 * single read, and start-up never scans the DEKs.
 *
 * Reads on the hot path are synchronous: the keyring, the KEK metadata, the rotation record and
 * the audit head are mirrored in memory (loaded at open, kept current by the store's change
 * events), DEK records come from a bounded cache. `peekDek` answers from the cache or the store's
 * local copy; when it returns undefined, `dek` asks the store (the one await a cluster store needs).
 */
import type { AuditHeadRecord } from '../../audit-link.js';
import { kmsError } from '../../errors.js';
import type { WrappedAuditKey } from '../../worker-abi/index.js';
import { addKekRefDeltas, applyVersionRewraps, type DekRecord } from '../dek-versions.js';
import { DekRecordCache } from './dek-cache.js';
import {
  AUDIT_HEAD,
  DEK_PREFIX,
  dekKey,
  FORMAT,
  FORMAT_VERSION,
  KCV,
  KEK_META,
  KEK_PREFIX,
  kekKey,
  MIGRATING,
  ROTATION,
  ROTATION_LOCK,
  THREAD_PREFIX,
  threadKey,
} from './keys.js';
import { LmdbStore } from './lmdb.js';
import { applyMasterRekey } from './master-rekey.js';
import { dueKeyIds, followPendingIndex, PENDING_PREFIX } from './pending-index.js';
import * as R from './records.js';
import type { RegistryStore, StoreChange, StoreCluster, StoreTxnView } from './store.js';
import { sameValue } from './store.js';

export type { DekRecord, DekVersionRecord } from '../dek-versions.js';
export { MIGRATING, ROTATION_LOCK } from './keys.js';
export type { KekMeta, KekRecord, MasterRekey, Rewrap, RotationRecord } from './records.js';
export type { ClusterStatus, RegistryStore, StoreCluster } from './store.js';

export const DEK_RECORD_CACHE_ENTRIES = 50_000;

type Stage = (record: DekRecord, bulk?: boolean) => void;

/** Why createDek did not store a new thread's key (the caller makes another). */
export type DekNotStored = 'kek-retired' | 'id-taken';

export class Registry {
  readonly #store: RegistryStore;
  readonly #cache = new DekRecordCache(DEK_RECORD_CACHE_ENTRIES);
  readonly #keks = new Map<number, R.KekRecord>();
  #kekMeta: R.KekMeta | undefined;
  #rotation: R.RotationRecord | undefined;
  #auditHead: AuditHeadRecord | undefined;
  readonly #unwatch: (() => void)[] = [];
  /** Where this process's audit head lives: the store itself, or the data directory's LMDB. */
  readonly #local: RegistryStore;

  private constructor(store: RegistryStore, local: RegistryStore) {
    this.#store = store;
    this.#local = local;
  }

  /**
   * The registry over `store`; refuses a registry format this version does not know. `local`,
   * for a store that several KMS replicas share, keeps what belongs to this process alone: the
   * audit head of its own audit log.
   */
  static async open(store: RegistryStore, local: RegistryStore = store): Promise<Registry> {
    const migrating = (await store.get(MIGRATING)) as { from?: string; startedAt?: string } | undefined;
    if (migrating !== undefined) {
      throw kmsError(
        'REGISTRY_MIGRATING',
        `a migration from ${migrating.from} (started ${migrating.startedAt}) has not finished: run progressdb-kms migrate again to finish it (or the same restore, for a backup file)`,
      );
    }
    const format = await store.get(FORMAT);
    if (format !== undefined && format !== FORMAT_VERSION) {
      throw kmsError('STORE_CORRUPT', `registry format ${String(format)} is not supported by this version`);
    }
    const registry = new Registry(store, local);
    await registry.#load();
    return registry;
  }

  /** The registry of a data directory (LMDB). */
  static async openDataDir(dataDir: string): Promise<Registry> {
    const store = LmdbStore.open(dataDir);
    try {
      return await Registry.open(store);
    } catch (err) {
      await store.close();
      throw err;
    }
  }

  /**
   * The audit head of a data directory, read without taking its lock (so `audit verify` can run
   * beside a live KMS). Undefined when the directory has no registry or the registry no head.
   */
  static readAuditHead(dataDir: string): AuditHeadRecord | undefined {
    return LmdbStore.readOnce(dataDir, AUDIT_HEAD) as AuditHeadRecord | undefined;
  }

  /** Subscribes before reading, so no change falls between the load and the first event. */
  async #load(): Promise<void> {
    const store = this.#store;
    this.#unwatch.push(
      store.watch(KEK_PREFIX, (c) => this.#kekChanged(c)),
      store.watch(KEK_META, (c) => {
        this.#kekMeta = c.value as R.KekMeta | undefined;
      }),
      store.watch(ROTATION, (c) => {
        this.#rotation = c.value as R.RotationRecord | undefined;
      }),
      this.#local.watch(AUDIT_HEAD, (c) => {
        this.#auditHead = c.value as AuditHeadRecord | undefined;
      }),
      store.watch(DEK_PREFIX, (c) => {
        // Our own commits report the record the cache already holds; anything else drops it.
        const keyId = c.key.slice(DEK_PREFIX.length);
        const cached = this.#cache.get(keyId);
        if (cached !== undefined && cached !== c.value) this.#cache.delete(keyId);
      }),
    );
    // The store fell behind etcd's history: what this cache holds may be stale too.
    const dropped = store.cluster?.onCacheDropped(() => this.#cache.clear());
    if (dropped !== undefined) this.#unwatch.push(dropped);
    await this.refresh();
    this.#auditHead = (await this.#local.get(AUDIT_HEAD)) as AuditHeadRecord | undefined;
  }

  /**
   * Reads the keyring, the KEK metadata and the rotation record from the store again (a cluster
   * store reads linearizably): after losing a race to another process, what it wrote is here at
   * once, without waiting for its change events.
   */
  async refresh(): Promise<void> {
    const store = this.#store;
    for (const { key, value } of await store.range(KEK_PREFIX)) this.#kekChanged({ key, value });
    this.#kekMeta = (await store.get(KEK_META)) as R.KekMeta | undefined;
    this.#rotation = (await store.get(ROTATION)) as R.RotationRecord | undefined;
  }

  #kekChanged({ key, value }: StoreChange): void {
    const version = Number(key.slice(KEK_PREFIX.length));
    if (value === undefined) this.#keks.delete(version);
    else this.#keks.set(version, value as R.KekRecord);
  }

  /**
   * Runs `action` atomically. `stage` writes a DEK record and keeps the cache in step; see
   * DekRecordCache for why entries are re-checked after the commit.
   */
  async #transact<T>(action: (tx: StoreTxnView, stage: Stage) => T): Promise<T> {
    const staged = new Map<string, DekRecord>();
    try {
      return await this.#store.atomically((tx) => {
        // Bulk writes (rotation) only refresh entries already cached, so a pass over the whole
        // table does not push the hot keys out.
        const stage: Stage = (record, bulk = false) => {
          tx.put(dekKey(record.keyId), record);
          if (!bulk || this.#cache.get(record.keyId) !== undefined) this.#cache.set(record.keyId, record);
          staged.set(record.keyId, record);
        };
        return action(tx, stage);
      });
    } catch (err) {
      this.#cache.clear();
      throw err;
    } finally {
      for (const [keyId, record] of staged) {
        if (this.#cache.get(keyId) !== record) this.#cache.delete(keyId);
      }
    }
  }

  /**
   * Calls `listener` for every committed change of a DEK record: this process's own and, with a
   * shared store, those of the other replicas (undefined: the record was deleted).
   */
  onDekChange(listener: (keyId: string, record: DekRecord | undefined) => void): void {
    this.#unwatch.push(
      this.#store.watch(DEK_PREFIX, (c) =>
        listener(c.key.slice(DEK_PREFIX.length), c.value as DekRecord | undefined),
      ),
    );
  }

  /** This process's membership when the store is shared by a cluster; undefined for one node. */
  get cluster(): StoreCluster | undefined {
    return this.#store.cluster;
  }

  /** Throws REGISTRY_UNAVAILABLE when this cluster replica may not serve (no live lease). */
  assertServing(): void {
    this.#store.cluster?.assertServing();
  }

  /** Resolves once every live replica has applied this process's commits (at once for one node). */
  async confirmApplied(): Promise<void> {
    await this.#store.cluster?.confirmApplied();
  }

  /**
   * Compacts a cluster store's history up to this process's last commit and returns that
   * revision; undefined for one node, which keeps no history.
   */
  async compactHistory(): Promise<string | undefined> {
    return await this.#store.cluster?.compactHistory();
  }

  /**
   * In a cluster, refuses a rotation write unless this replica holds the rotation lock: the read
   * makes the lock part of the transaction's compares, so losing it aborts the commit.
   */
  #fenceRotation(tx: StoreTxnView): void {
    const cluster = this.#store.cluster;
    if (cluster !== undefined && !cluster.holds(tx.get(cluster.lockKey(ROTATION_LOCK)))) {
      throw kmsError('ROTATION_IN_PROGRESS', 'this replica no longer holds the rotation lock');
    }
  }

  auditHead(): AuditHeadRecord | undefined {
    return this.#auditHead;
  }

  /**
   * Saves the audit head; callers save only what the log already holds durably. Never waits for
   * the store's other writes (see RegistryStore.putNow); a synchronous failure throws here: a
   * failed async lmdb-js commit also leaves an unhandled rejection behind, and a full disk is
   * when this must fail quietly.
   */
  putAuditHead(head: AuditHeadRecord): void {
    this.#local.putNow(AUDIT_HEAD, head);
  }

  async kcv(): Promise<Uint8Array | undefined> {
    return (await this.#store.get(KCV)) as Uint8Array | undefined;
  }

  /** Stores the key check value of a registry written before KCVs existed (first proven start). */
  putKcv(kcv: Uint8Array): void {
    this.#store.putNow(KCV, kcv);
  }

  kekMeta(): R.KekMeta | undefined {
    return this.#kekMeta;
  }

  async auditKeys(): Promise<WrappedAuditKey[]> {
    return ((await this.#store.get(R.AUDIT_KEYS)) as WrappedAuditKey[] | undefined) ?? [];
  }

  /** Commits a master re-key in one transaction (applyMasterRekey). */
  async rekeyMaster(rekey: R.MasterRekey): Promise<void> {
    await this.#store.atomically((tx) => applyMasterRekey(tx, rekey));
  }

  kek(version: number): R.KekRecord | undefined {
    return this.#keks.get(version);
  }

  /** Every stored KEK version, oldest first. */
  keks(): R.KekRecord[] {
    return [...this.#keks.values()].sort((a, b) => a.version - b.version);
  }

  rotation(): R.RotationRecord | undefined {
    return this.#rotation;
  }

  /** The record of `keyId` if known here at once; undefined: call `dek` (absent, or not local). */
  peekDek(keyId: string): DekRecord | undefined {
    let record = this.#cache.get(keyId);
    if (record === undefined) {
      record = this.#store.peek(dekKey(keyId)) as DekRecord | undefined;
      if (record !== undefined) this.#cache.set(keyId, record);
    }
    return record;
  }

  /** The record of `keyId`, fetched from the store and cached when `peekDek` does not know it. */
  async dek(keyId: string): Promise<DekRecord | undefined> {
    const known = this.peekDek(keyId);
    if (known !== undefined) return known;
    const record = (await this.#store.get(dekKey(keyId))) as DekRecord | undefined;
    if (record !== undefined) this.#cache.set(keyId, record);
    return record;
  }

  /** The thread's key id if known here at once; undefined: call `keyIdForThread`. */
  peekKeyIdForThread(threadId: string): string | undefined {
    return this.#store.peek(threadKey(threadId)) as string | undefined;
  }

  async keyIdForThread(threadId: string): Promise<string | undefined> {
    return (await this.#store.get(threadKey(threadId))) as string | undefined;
  }

  /** Active DEKs (one per thread). */
  dekCount(): Promise<number> {
    return this.#store.count(THREAD_PREFIX);
  }

  /**
   * Keys pending deletion whose window has ended by `nowMs`, soonest due first, at most `limit`:
   * one read of the index's first page, whatever the number of keys.
   */
  async dueDeletions(nowMs: number, limit: number): Promise<string[]> {
    return dueKeyIds(await this.#store.range(PENDING_PREFIX, { limit }), nowMs);
  }

  /** All DEK records including tombstones; used as the rotation's progress total. */
  dekRecordCount(): Promise<number> {
    return this.#store.count(DEK_PREFIX);
  }

  /** DEK records after `after` (exclusive), in key order, at most `limit`. */
  async deksAfter(after: string | null, limit: number): Promise<DekRecord[]> {
    const entries = await this.#store.range(DEK_PREFIX, {
      after: after === null ? undefined : dekKey(after),
      limit,
    });
    return entries.map(({ value }) => value as DekRecord);
  }

  /** First start: records KEK version 1. Returns false if another process initialised first. */
  async initKek(meta: R.KekMeta, kek: R.KekRecord, kcv: Uint8Array): Promise<boolean> {
    const { committed } = await this.#store.transaction({
      compares: [{ key: KEK_META, absent: true }],
      puts: [
        { key: FORMAT, value: FORMAT_VERSION },
        { key: KCV, value: kcv },
        { key: kekKey(kek.version), value: kek },
        { key: KEK_META, value: meta },
      ],
    });
    return committed;
  }

  /** Applies KEK reference-count changes (keyed by KEK version) inside a transaction. */
  #applyRefs(tx: StoreTxnView, deltas: Map<number, number>): void {
    for (const [version, delta] of deltas) {
      if (delta === 0) continue;
      const kek = tx.get(kekKey(version)) as R.KekRecord | undefined;
      if (kek === undefined) throw kmsError('STORE_CORRUPT', `KEK version ${version} is missing`);
      tx.put(kekKey(version), { ...kek, refs: kek.refs + delta });
    }
  }

  /**
   * Stores a new thread DEK unless the thread already has one; returns the record that won, or
   * why it was not stored, for the caller to make another key: a rotation retired the KEK version
   * it was wrapped under, or its key id is taken (80 random bits per millisecond make that
   * practically impossible, but a collision must never replace another thread's key).
   */
  createDek(record: DekRecord): Promise<DekRecord | DekNotStored> {
    return this.#transact<DekRecord | DekNotStored>((tx, stage) => {
      const existingId = tx.get(threadKey(record.threadId)) as string | undefined;
      const existing = existingId === undefined ? undefined : (tx.get(dekKey(existingId)) as DekRecord);
      if (existing !== undefined && existing.state === 'active') return existing;
      if (record.versions.some((x) => tx.get(kekKey(x.kek)) === undefined)) return 'kek-retired';
      if (tx.get(dekKey(record.keyId)) !== undefined) return 'id-taken';
      this.#applyRefs(tx, addKekRefDeltas(new Map(), undefined, record));
      stage(record);
      tx.put(threadKey(record.threadId), record.keyId);
      return record;
    });
  }

  /**
   * Read-modify-write of one DEK record in a transaction. `change` gets the current record and
   * returns the new one (or the same object for "no change"); it may throw a CodedError to abort.
   * Reference counts, the thread index and the pending-deletion index follow automatically.
   */
  updateDek(keyId: string, change: (current: DekRecord) => DekRecord): Promise<DekRecord> {
    return this.#transact((tx, stage) => {
      const current = tx.get(dekKey(keyId)) as DekRecord | undefined;
      if (current === undefined) throw kmsError('KEY_NOT_FOUND', `no key ${keyId}`);
      const next = change(current);
      if (next === current) return current;
      this.#applyRefs(tx, addKekRefDeltas(new Map(), current, next));
      stage(next);
      followPendingIndex(tx, current, next);
      if (next.state === 'destroyed' && tx.get(threadKey(current.threadId)) === keyId) {
        tx.delete(threadKey(current.threadId));
      }
      return next;
    });
  }

  /**
   * Adds a new active KEK version and records a running rotation to it, atomically. Refused with
   * ROTATION_IN_PROGRESS when that version exists or is not the next one (another replica began
   * first: overwriting its KEK would strand the DEKs it rewrapped), and with MASTER_KEY_MISMATCH
   * when `kcv` is not the registry's (a process left on the master key of before a re-key).
   */
  async beginRotation(kek: R.KekRecord, rotation: R.RotationRecord, kcv: Uint8Array): Promise<void> {
    await this.#store.atomically((tx) => {
      this.#fenceRotation(tx);
      if (!sameValue(tx.get(KCV), kcv))
        throw kmsError('MASTER_KEY_MISMATCH', 'the registry was re-keyed: restart with its new master key');
      const meta = tx.get(KEK_META) as R.KekMeta;
      if (tx.get(kekKey(kek.version)) !== undefined || meta.activeVersion + 1 !== kek.version) {
        throw kmsError('ROTATION_IN_PROGRESS', `KEK version ${kek.version} was started by another process`);
      }
      tx.put(kekKey(kek.version), kek);
      tx.put(KEK_META, { ...meta, activeVersion: kek.version });
      tx.put(ROTATION, rotation);
    });
  }

  /**
   * Applies one rotation batch and its progress in one transaction. A rewrap whose record changed
   * since it was read (destroyed, rewrapped, version removed) is skipped: compare-and-set, so a
   * concurrent change is never overwritten and every version stays wrapped under a live KEK.
   */
  applyRewraps(rewraps: readonly R.Rewrap[], progress: R.RotationRecord): Promise<number> {
    return this.#transact((tx, stage) => {
      this.#fenceRotation(tx);
      const deltas = new Map<number, number>();
      let applied = 0;
      // Rewraps come grouped by key (one record's versions are adjacent).
      for (let i = 0, end = 0; i < rewraps.length; i = end) {
        // biome-ignore lint/style/noNonNullAssertion: i and end stay below rewraps.length
        const keyId = rewraps[i]!.keyId;
        // biome-ignore lint/style/noNonNullAssertion: i and end stay below rewraps.length
        while (end < rewraps.length && rewraps[end]!.keyId === keyId) end++;
        const record = tx.get(dekKey(keyId)) as DekRecord | undefined;
        if (record === undefined) continue;
        // biome-ignore lint/style/noNonNullAssertion: i and end stay below rewraps.length
        const result = applyVersionRewraps(record, end - i === 1 ? [rewraps[i]!] : rewraps.slice(i, end));
        if (result.record === record) continue;
        addKekRefDeltas(deltas, record, result.record);
        stage(result.record, true);
        applied += result.applied;
      }
      this.#applyRefs(tx, deltas);
      tx.put(ROTATION, progress);
      return applied;
    });
  }

  /** Saves rotation progress alone (a batch with nothing to rewrap, or a new pass). */
  async saveRotation(progress: R.RotationRecord): Promise<void> {
    await this.#store.atomically((tx) => {
      this.#fenceRotation(tx);
      tx.put(ROTATION, progress);
    });
  }

  /**
   * Ends a rotation: destroys every non-active KEK version that no DEK version references any more,
   * and records completion. Returns the versions destroyed.
   */
  finishRotation(progress: R.RotationRecord): Promise<number[]> {
    const versions = [...this.#keks.keys()].sort((a, b) => a - b);
    return this.#store.atomically((tx) => {
      this.#fenceRotation(tx);
      const meta = tx.get(KEK_META) as R.KekMeta;
      const destroyed: number[] = [];
      for (const version of versions) {
        const kek = tx.get(kekKey(version)) as R.KekRecord | undefined;
        if (kek !== undefined && version !== meta.activeVersion && kek.refs === 0) {
          tx.delete(kekKey(version));
          destroyed.push(version);
        }
      }
      tx.put(ROTATION, progress);
      return destroyed;
    });
  }

  async close(): Promise<void> {
    for (const unwatch of this.#unwatch.splice(0)) unwatch();
    await this.#store.close();
    if (this.#local !== this.#store) await this.#local.close();
  }
}
