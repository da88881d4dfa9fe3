/**
 * The registry store of one node: `registry.mdb` in the data directory, in the layout it has
 * always had (sub-databases `meta`, `keks` keyed by version number, `deks`, `threads`, and since
 * the deletion window `pending`, values in
 * lmdb-js msgpack), so every existing directory opens as it is. Store keys map onto it (see
 * `locate`). Only this process writes it (the data directory is locked), so change events for
 * its own commits are every change there is.
 */
import fs from 'node:fs';
import path from 'node:path';
import { type Database, open, type RootDatabase, type Transaction } from 'lmdb';
import { kmsError } from '../../errors.js';
import { createPrivateFiles } from '../../private-files.js';
import {
  ChangeListeners,
  type RangeOptions,
  type RegistrySnapshot,
  type RegistryStore,
  type StoreChange,
  type StoreEntry,
  type StoreTransaction,
  type StoreTxnView,
  sameValue,
} from './store.js';

type LmdbKey = string | number;

/** Namespaces (prefix → sub-database); kek versions are number keys, as they always were. */
const NAMESPACES = {
  'kek/': { db: 'keks', numeric: true },
  'dek/': { db: 'deks', numeric: false },
  'thread/': { db: 'threads', numeric: false },
  'pending/': { db: 'pending', numeric: false },
} as const;
type Namespace = keyof typeof NAMESPACES;

/** Single keys, all in the `meta` sub-database under their historical names. */
const META_KEYS: Record<string, string> = {
  'meta/kek': 'kek',
  'meta/format': 'format',
  'meta/kcv': 'kcv',
  'meta/audit-keys': 'audit_keys',
  rotation: 'rotation',
  'audit-head': 'audit_head',
  // Only a cluster store ever holds it (migrate.ts); asked for by Registry.open on any store.
  'meta/migrating': 'migrating',
};

export const REGISTRY_FILE = 'registry.mdb';
const FILE_NAME = REGISTRY_FILE;

function openRoot(file: string, readOnly: boolean): RootDatabase {
  return open({ path: file, compression: false, maxDbs: 8, readOnly });
}

/** A sub-database absent from a registry opened read-only: the reads the store makes, all empty. */
const EMPTY_DB = {
  get: () => undefined,
  getRange: () => [],
  getCount: () => 0,
  getStats: () => ({ entryCount: 0 }),
} as unknown as Database<unknown, LmdbKey>;

function namespaceOf(key: string): Namespace | undefined {
  const slash = key.indexOf('/');
  const prefix = key.slice(0, slash + 1);
  return prefix in NAMESPACES ? (prefix as Namespace) : undefined;
}

interface PendingCall {
  fn: (tx: StoreTxnView) => unknown;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

type CallOutcome =
  | { ok: true; value: unknown; changes: Map<string, StoreChange> }
  | { ok: false; error: unknown };

export class LmdbStore implements RegistryStore {
  readonly #root: RootDatabase;
  readonly #dbs: Record<string, Database<unknown, LmdbKey>>;
  readonly #listeners = new ChangeListeners();
  /** Async writes not yet committed; putNow joins them rather than wait for their write lock. */
  #writesInFlight = 0;
  /** atomically() calls waiting for the next write transaction (see atomically). */
  #batch: PendingCall[] = [];

  private constructor(root: RootDatabase) {
    this.#root = root;
    this.#dbs = {};
    for (const name of ['meta', 'keks', 'deks', 'threads', 'pending']) {
      // lmdb-js gives no database for a name a read-only open does not find: a registry written
      // before the sub-database existed (`pending`) reads as if it were empty.
      this.#dbs[name] = (root.openDB({ name }) as Database<unknown, LmdbKey> | undefined) ?? EMPTY_DB;
    }
  }

  /** Opens (or creates, 0600) the registry of a data directory. */
  static open(dataDir: string): LmdbStore {
    const file = path.join(dataDir, FILE_NAME);
    createPrivateFiles([file, `${file}-lock`]);
    return new LmdbStore(openRoot(file, false));
  }

  /**
   * Opens (or creates, 0600) a registry file at `file` itself: restore writes a new registry
   * under a temporary name and renames it into place once it is complete.
   */
  static openFile(file: string): LmdbStore {
    createPrivateFiles([file, `${file}-lock`]);
    return new LmdbStore(openRoot(file, false));
  }

  /**
   * A data directory's whole registry as of one moment: every read goes through one LMDB read
   * transaction, which sees the last commit before it began and nothing after, whatever a live
   * KMS commits meanwhile. Opened read-only and without the directory lock (LMDB lets readers
   * share the file with its writer), so it runs beside a serving KMS. Undefined: no registry.
   */
  static snapshot(dataDir: string): RegistrySnapshot | undefined {
    const file = path.join(dataDir, FILE_NAME);
    if (!fs.existsSync(file)) return undefined;
    const store = new LmdbStore(openRoot(file, true));
    const txn = store.#root.useReadTransaction();
    return {
      get: async (key) => store.#peekIn(key, txn),
      count: async (prefix) => store.#namespace(prefix).db.getCount({ transaction: txn }),
      range: async (prefix, options) => store.#rangeIn(prefix, options ?? {}, txn),
      close: async () => {
        txn.done();
        await store.#root.close();
      },
    };
  }

  /** One value of a data directory's registry, read without its lock (undefined: no registry). */
  static readOnce(dataDir: string, key: string): unknown {
    const file = path.join(dataDir, FILE_NAME);
    if (!fs.existsSync(file)) return undefined;
    const store = new LmdbStore(openRoot(file, true));
    try {
      return store.peek(key);
    } finally {
      store.#root.close();
    }
  }

  /** The sub-database and key a store key lives at. */
  #locate(key: string): { db: Database<unknown, LmdbKey>; key: LmdbKey } {
    const meta = META_KEYS[key];
    // biome-ignore lint/style/noNonNullAssertion: every namespace's sub-database is opened in the constructor
    if (meta !== undefined) return { db: this.#dbs.meta!, key: meta };
    const ns = namespaceOf(key);
    if (ns === undefined) throw kmsError('INTERNAL', `no registry namespace for key ${key}`);
    const rest = key.slice(ns.length);
    const { db, numeric } = NAMESPACES[ns];
    // biome-ignore lint/style/noNonNullAssertion: every namespace's sub-database is opened in the constructor
    return { db: this.#dbs[db]!, key: numeric ? Number(rest) : rest };
  }

  #namespace(prefix: string): { db: Database<unknown, LmdbKey>; numeric: boolean } {
    const ns = NAMESPACES[prefix as Namespace];
    if (ns === undefined) throw kmsError('INTERNAL', `no registry namespace ${prefix}`);
    // biome-ignore lint/style/noNonNullAssertion: every namespace's sub-database is opened in the constructor
    return { db: this.#dbs[ns.db]!, numeric: ns.numeric };
  }

  peek(key: string): unknown {
    return this.#peekIn(key, undefined);
  }

  #peekIn(key: string, transaction: Transaction | undefined): unknown {
    const at = this.#locate(key);
    return transaction === undefined ? at.db.get(at.key) : at.db.get(at.key, { transaction });
  }

  async get(key: string): Promise<unknown> {
    return this.peek(key);
  }

  async range(prefix: string, options: RangeOptions = {}): Promise<StoreEntry[]> {
    return this.#rangeIn(prefix, options, undefined);
  }

  #rangeIn(prefix: string, options: RangeOptions, transaction: Transaction | undefined): StoreEntry[] {
    const { db, numeric } = this.#namespace(prefix);
    const limit = options.limit ?? Number.POSITIVE_INFINITY;
    const after = options.after === undefined ? undefined : this.#locate(options.after).key;
    const out: StoreEntry[] = [];
    if (limit <= 0) return out;
    const span = Number.isFinite(limit) ? limit + 1 : undefined;
    for (const { key, value } of db.getRange({
      start: after,
      limit: span,
      ...(transaction && { transaction }),
    })) {
      if (key === after) continue;
      out.push({ key: prefix + (numeric ? String(key) : key), value });
      if (out.length === limit) break;
    }
    return out;
  }

  /** Constant time: LMDB keeps each sub-database's entry count. */
  async count(prefix: string): Promise<number> {
    return (this.#namespace(prefix).db.getStats() as { entryCount: number }).entryCount;
  }

  transaction(txn: StoreTransaction): Promise<{ committed: boolean }> {
    return this.atomically((tx) => {
      for (const compare of txn.compares ?? []) {
        const current = tx.get(compare.key);
        const holds = 'absent' in compare ? current === undefined : sameValue(current, compare.equals);
        if (!holds) return { committed: false };
      }
      for (const { key, value } of txn.puts ?? []) tx.put(key, value);
      for (const key of txn.deletes ?? []) tx.delete(key);
      return { committed: true };
    });
  }

  /**
   * Runs `fn` once inside an LMDB write transaction. Calls made while one is waiting for the write
   * lock share it (one commit, as lmdb-js would batch them anyway) and run one after another, each
   * seeing the writes of those before it; each key is then written once per batch. Thread creates
   * all raise the count of the same KEK version: that record was decoded, encoded and put once
   * per create, now once per commit (+15% creates/s, bench/results/creates.md). A call's writes
   * are held until it returns, so a throw writes nothing of it and the others still commit.
   */
  atomically<T>(fn: (tx: StoreTxnView) => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#batch.push({ fn, resolve: resolve as (value: unknown) => void, reject });
      if (this.#batch.length === 1) void this.#commitBatch();
    });
  }

  async #commitBatch(): Promise<void> {
    // The calls this transaction took, once its callback runs. Kept here, not on the store: with
    // lmdb-js's overlapping sync the next transaction's callback can run before this one commits.
    let calls: PendingCall[] | null = null;
    let ran: { entry: PendingCall; outcome: CallOutcome }[];
    try {
      ran = await this.#write(() => {
        calls = this.#batch;
        this.#batch = [];
        return this.#runCalls(calls);
      });
    } catch (err) {
      // The calls the failed transaction ran, or, if it failed before running them, the ones
      // waiting for it (no other transaction was scheduled for them): each learns of the failure,
      // and nothing of theirs was written.
      let failed: PendingCall[] = calls ?? [];
      if (calls === null) {
        failed = this.#batch;
        this.#batch = [];
      }
      for (const entry of failed) entry.reject(err);
      return;
    }
    for (const { entry, outcome } of ran) {
      if (!outcome.ok) {
        entry.reject(outcome.error);
        continue;
      }
      this.#listeners.emit(outcome.changes.values());
      entry.resolve(outcome.value);
    }
  }

  /** Inside the write transaction: runs each call over the batch's writes so far, then writes them. */
  #runCalls(calls: PendingCall[]): { entry: PendingCall; outcome: CallOutcome }[] {
    const written = new Map<string, StoreChange>();
    const ran = calls.map((entry) => {
      const changes = new Map<string, StoreChange>();
      const view: StoreTxnView = {
        get: (key) => (changes.get(key) ?? written.get(key) ?? { value: this.peek(key) }).value,
        put: (key, value) => {
          changes.set(key, { key, value });
        },
        delete: (key) => {
          changes.set(key, { key, value: undefined });
        },
      };
      try {
        const value = entry.fn(view);
        for (const [key, change] of changes) written.set(key, change);
        return { entry, outcome: { ok: true, value, changes } as CallOutcome };
      } catch (error) {
        return { entry, outcome: { ok: false, error } as CallOutcome };
      }
    });
    for (const { key, value } of written.values()) {
      const at = this.#locate(key);
      if (value === undefined) at.db.removeSync(at.key);
      else at.db.putSync(at.key, value);
    }
    return ran;
  }

  putNow(key: string, value: unknown): void {
    const at = this.#locate(key);
    if (this.#writesInFlight === 0) {
      at.db.putSync(at.key, value);
      this.#listeners.emit([{ key, value }]);
      return;
    }
    // Counted as a write, so a later synchronous save cannot commit before this one.
    this.#write(() => at.db.putSync(at.key, value))
      .then(() => this.#listeners.emit([{ key, value }]))
      .catch(() => {});
  }

  /** A write transaction, counted while in flight (see putNow). */
  async #write<T>(action: () => T): Promise<T> {
    this.#writesInFlight++;
    try {
      return await this.#root.transaction(action);
    } finally {
      this.#writesInFlight--;
    }
  }

  watch(prefix: string, onChange: (change: StoreChange) => void): () => void {
    return this.#listeners.add(prefix, onChange);
  }

  async close(): Promise<void> {
    await this.#root.close();
  }
}
