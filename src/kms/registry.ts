/**
 * The KMS registry in LMDB: KEK versions (wrapped under the master key), DEK records (each version
 * wrapped under a KEK version), the thread → key index and KEK rotation progress. Holds wrapped
 * material only.
 *
 * Every change that touches which KEK version wraps which DEK version also updates that KEK
 * version's reference count in the same transaction, so "is this KEK version still needed?" is a
 * single read, and start-up never scans the DEKs.
 */
import fs from 'node:fs';
import path from 'node:path';
import { type Database, open, type RootDatabase } from 'lmdb';
import type { AuditHeadRecord } from '../audit-link.js';
import { kmsError } from '../errors.js';
import { createPrivateFiles } from '../private-files.js';
import { addKekRefDeltas, applyVersionRewraps, type DekRecord, type VersionRewrap } from './dek-versions.js';

export type { DekRecord, DekVersionRecord } from './dek-versions.js';

export interface KekRecord {
  kekId: string;
  version: number;
  wrapped: Uint8Array;
  createdAt: string;
  /** DEK versions wrapped under this KEK version. */
  refs: number;
}

export interface KekMeta {
  kekId: string;
  activeVersion: number;
  createdAt: string;
}

export interface RotationRecord {
  state: 'running' | 'completed';
  target: number;
  /** Last DEK key id processed in the current pass, or null at the start of a pass. */
  cursor: string | null;
  done: number;
  total: number;
  startedAt: string;
  finishedAt: string | null;
}

/** One DEK version rewrapped by the rotation: applied only if the record still holds `from`. */
export interface Rewrap extends VersionRewrap {
  keyId: string;
}

const META_KEK = 'kek';
const META_ROTATION = 'rotation';
const META_FORMAT = 'format';
/** Key check value of the KEK-wrapping key (CheckKekTask): tells a wrong master key from corruption. */
const META_KCV = 'kcv';
/** Where the audit log's sessions have reached (src/audit-link.ts): what `audit verify` checks the log against. */
const META_AUDIT_HEAD = 'audit_head';
const FORMAT_VERSION = 1;

/**
 * Decoded DEK records for the encrypt/decrypt hot path (FIFO-bounded). Only this registry writes
 * the DEK table (the data directory is locked), so it keeps the cache exact itself: every write
 * goes through `#transact`, which stores the new record in the cache as it stages it and, after
 * the commit, drops any entry that a concurrent read may have filled with the pre-commit value.
 * (lmdb's own `cache` option did the same job but cost ~15% of a KEK rotation in bookkeeping.)
 */
class DekRecordCache {
  readonly #entries = new Map<string, DekRecord>();
  readonly #capacity: number;

  constructor(capacity: number) {
    this.#capacity = capacity;
  }

  get(keyId: string): DekRecord | undefined {
    return this.#entries.get(keyId);
  }

  set(keyId: string, record: DekRecord): void {
    if (this.#entries.size >= this.#capacity && !this.#entries.has(keyId)) {
      this.#entries.delete(this.#entries.keys().next().value as string);
    }
    this.#entries.set(keyId, record);
  }

  delete(keyId: string): void {
    this.#entries.delete(keyId);
  }

  clear(): void {
    this.#entries.clear();
  }
}

const DEK_CACHE_ENTRIES = 50_000;

export class Registry {
  readonly #root: RootDatabase;
  readonly #meta: Database<unknown, string>;
  readonly #keks: Database<KekRecord, number>;
  readonly #deks: Database<DekRecord, string>;
  readonly #threads: Database<string, string>;
  readonly #cache = new DekRecordCache(DEK_CACHE_ENTRIES);
  #writesInFlight = 0;

  private constructor(root: RootDatabase) {
    this.#root = root;
    this.#meta = root.openDB({ name: 'meta' });
    this.#keks = root.openDB({ name: 'keks' });
    this.#deks = root.openDB({ name: 'deks' });
    this.#threads = root.openDB({ name: 'threads' });
  }

  /**
   * Runs `action` in a write transaction. `stage` writes a DEK record and keeps the cache in step;
   * see DekRecordCache for why entries are re-checked after the commit.
   */
  async #transact<T>(action: (stage: (record: DekRecord, bulk?: boolean) => void) => T): Promise<T> {
    const staged = new Map<string, DekRecord>();
    // Bulk writes (rotation) only refresh entries already cached, so a pass over the whole table
    // does not push the hot keys out.
    const stage = (record: DekRecord, bulk = false) => {
      this.#deks.putSync(record.keyId, record);
      if (!bulk || this.#cache.get(record.keyId) !== undefined) this.#cache.set(record.keyId, record);
      staged.set(record.keyId, record);
    };
    try {
      return await this.#write(() => action(stage));
    } catch (err) {
      this.#cache.clear();
      throw err;
    } finally {
      for (const [keyId, record] of staged) {
        if (this.#cache.get(keyId) !== record) this.#cache.delete(keyId);
      }
    }
  }

  static open(dataDir: string): Registry {
    const file = path.join(dataDir, 'registry.mdb');
    createPrivateFiles([file, `${file}-lock`]);
    const root = open({ path: file, compression: false, maxDbs: 8 });
    const registry = new Registry(root);
    const format = registry.#meta.get(META_FORMAT);
    if (format !== undefined && format !== FORMAT_VERSION) {
      root.close();
      throw kmsError('STORE_CORRUPT', `registry format ${String(format)} is not supported by this version`);
    }
    return registry;
  }

  /**
   * The audit head of a data directory, read without taking its lock (so `audit verify` can run
   * beside a live KMS). Undefined when the directory has no registry or the registry no head.
   */
  static readAuditHead(dataDir: string): AuditHeadRecord | undefined {
    const file = path.join(dataDir, 'registry.mdb');
    if (!fs.existsSync(file)) return undefined;
    const root = open({ path: file, compression: false, maxDbs: 8, readOnly: true });
    try {
      return root.openDB({ name: 'meta' }).get(META_AUDIT_HEAD) as AuditHeadRecord | undefined;
    } finally {
      root.close();
    }
  }

  auditHead(): AuditHeadRecord | undefined {
    return this.#meta.get(META_AUDIT_HEAD) as AuditHeadRecord | undefined;
  }

  /**
   * Saves the audit head; callers save only what the log already holds durably. While the
   * registry's own writes are in flight the head joins them asynchronously (a synchronous commit
   * would wait for their write lock, stalling the main thread for milliseconds under load).
   * Otherwise it commits synchronously (~0.5 ms) and a failure throws here: a failed async lmdb-js
   * commit also leaves an unhandled rejection behind, and a full disk is when this must fail quietly.
   */
  putAuditHead(head: AuditHeadRecord): void {
    if (this.#writesInFlight === 0) {
      this.#meta.putSync(META_AUDIT_HEAD, head);
      return;
    }
    // Counted as a write, so a later synchronous save cannot commit before this one.
    this.#write(() => this.#meta.putSync(META_AUDIT_HEAD, head)).catch(() => {});
  }

  /** A write transaction, counted while in flight (see putAuditHead). */
  async #write<T>(action: () => T): Promise<T> {
    this.#writesInFlight++;
    try {
      return await this.#root.transaction(action);
    } finally {
      this.#writesInFlight--;
    }
  }

  kcv(): Uint8Array | undefined {
    return this.#meta.get(META_KCV) as Uint8Array | undefined;
  }

  /** Stores the key check value of a registry written before KCVs existed (first proven start). */
  putKcv(kcv: Uint8Array): void {
    this.#meta.putSync(META_KCV, kcv);
  }

  kekMeta(): KekMeta | undefined {
    return this.#meta.get(META_KEK) as KekMeta | undefined;
  }

  kek(version: number): KekRecord | undefined {
    return this.#keks.get(version);
  }

  keks(): KekRecord[] {
    return [...this.#keks.getRange({}).map(({ value }) => value)];
  }

  rotation(): RotationRecord | undefined {
    return this.#meta.get(META_ROTATION) as RotationRecord | undefined;
  }

  dek(keyId: string): DekRecord | undefined {
    let record = this.#cache.get(keyId);
    if (record === undefined) {
      record = this.#deks.get(keyId);
      if (record !== undefined) this.#cache.set(keyId, record);
    }
    return record;
  }

  keyIdForThread(threadId: string): string | undefined {
    return this.#threads.get(threadId);
  }

  /** Active DEKs (one per thread). Constant time: LMDB keeps the count. */
  dekCount(): number {
    return (this.#threads.getStats() as { entryCount: number }).entryCount;
  }

  /** All DEK records including tombstones; used as the rotation's progress total. */
  dekRecordCount(): number {
    return (this.#deks.getStats() as { entryCount: number }).entryCount;
  }

  /** DEK records after `after` (exclusive), in key order, at most `limit`. */
  deksAfter(after: string | null, limit: number): DekRecord[] {
    const out: DekRecord[] = [];
    for (const { key, value } of this.#deks.getRange({ start: after ?? undefined, limit: limit + 1 })) {
      if (key === after) continue;
      out.push(value);
      if (out.length === limit) break;
    }
    return out;
  }

  /** First start: records KEK version 1. Returns false if another process initialised first. */
  initKek(meta: KekMeta, kek: KekRecord, kcv: Uint8Array): Promise<boolean> {
    return this.#write(() => {
      if (this.#meta.get(META_KEK) !== undefined) return false;
      this.#meta.putSync(META_FORMAT, FORMAT_VERSION);
      this.#meta.putSync(META_KCV, kcv);
      this.#keks.putSync(kek.version, kek);
      this.#meta.putSync(META_KEK, meta);
      return true;
    });
  }

  /** Applies KEK reference-count changes (keyed by KEK version). Call inside a transaction. */
  #applyRefs(deltas: Map<number, number>): void {
    for (const [version, delta] of deltas) {
      if (delta === 0) continue;
      const kek = this.#keks.get(version);
      if (kek === undefined) throw kmsError('STORE_CORRUPT', `KEK version ${version} is missing`);
      this.#keks.putSync(version, { ...kek, refs: kek.refs + delta });
    }
  }

  /** Stores a new thread DEK unless the thread already has one; returns the record that won. */
  createDek(record: DekRecord): Promise<DekRecord> {
    return this.#transact((stage) => {
      const existingId = this.#threads.get(record.threadId);
      const existing = existingId === undefined ? undefined : this.#deks.get(existingId);
      if (existing !== undefined && existing.state === 'active') return existing;
      this.#applyRefs(addKekRefDeltas(new Map(), undefined, record));
      stage(record);
      this.#threads.putSync(record.threadId, record.keyId);
      return record;
    });
  }

  /**
   * Read-modify-write of one DEK record in a transaction. `change` gets the current record and
   * returns the new one (or the same object for "no change"); it may throw a CodedError to abort.
   * Reference counts and the thread index follow automatically.
   */
  updateDek(keyId: string, change: (current: DekRecord) => DekRecord): Promise<DekRecord> {
    return this.#transact((stage) => {
      const current = this.#deks.get(keyId);
      if (current === undefined) throw kmsError('KEY_NOT_FOUND', `no key ${keyId}`);
      const next = change(current);
      if (next === current) return current;
      this.#applyRefs(addKekRefDeltas(new Map(), current, next));
      stage(next);
      if (next.state === 'destroyed' && this.#threads.get(current.threadId) === keyId) {
        this.#threads.removeSync(current.threadId);
      }
      return next;
    });
  }

  /** Adds a new active KEK version and records a running rotation to it, atomically. */
  beginRotation(kek: KekRecord, rotation: RotationRecord): Promise<void> {
    return this.#write(() => {
      const meta = this.#meta.get(META_KEK) as KekMeta;
      this.#keks.putSync(kek.version, kek);
      this.#meta.putSync(META_KEK, { ...meta, activeVersion: kek.version });
      this.#meta.putSync(META_ROTATION, rotation);
    });
  }

  /**
   * Applies one rotation batch and its progress in one transaction. A rewrap whose record changed
   * since it was read (destroyed, rewrapped, version removed) is skipped: compare-and-set, so a
   * concurrent change is never overwritten and every version stays wrapped under a live KEK.
   */
  applyRewraps(rewraps: readonly Rewrap[], progress: RotationRecord): Promise<number> {
    return this.#transact((stage) => {
      const deltas = new Map<number, number>();
      let applied = 0;
      // Rewraps come grouped by key (one record's versions are adjacent).
      for (let i = 0, end = 0; i < rewraps.length; i = end) {
        const keyId = rewraps[i]!.keyId;
        while (end < rewraps.length && rewraps[end]!.keyId === keyId) end++;
        const record = this.#deks.get(keyId);
        if (record === undefined) continue;
        const result = applyVersionRewraps(record, end - i === 1 ? [rewraps[i]!] : rewraps.slice(i, end));
        if (result.record === record) continue;
        addKekRefDeltas(deltas, record, result.record);
        stage(result.record, true);
        applied += result.applied;
      }
      this.#applyRefs(deltas);
      this.#meta.putSync(META_ROTATION, progress);
      return applied;
    });
  }

  /** Saves rotation progress alone (a batch with nothing to rewrap, or a new pass). */
  saveRotation(progress: RotationRecord): Promise<void> {
    return this.#write(() => {
      this.#meta.putSync(META_ROTATION, progress);
    });
  }

  /**
   * Ends a rotation: destroys every non-active KEK version that no DEK version references any more,
   * and records completion. Returns the versions destroyed.
   */
  finishRotation(progress: RotationRecord): Promise<number[]> {
    return this.#write(() => {
      const meta = this.#meta.get(META_KEK) as KekMeta;
      const destroyed: number[] = [];
      for (const { key, value } of this.#keks.getRange({})) {
        if (key !== meta.activeVersion && value.refs === 0) {
          this.#keks.removeSync(key);
          destroyed.push(key);
        }
      }
      this.#meta.putSync(META_ROTATION, progress);
      return destroyed;
    });
  }

  async close(): Promise<void> {
    await this.#root.close();
  }
}
