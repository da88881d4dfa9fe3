/**
 * Group commit for the etcd store: the atomically() calls that arrive while a transaction is in
 * flight run together, in order, against one set of reads, and commit as one etcd transaction.
 *
 * Without it every concurrent create on a replica would race the others for the same KEK
 * reference count and all but one would re-run: 256 concurrent creates took 11 s on one member
 * and 205 of them gave up. Together they cost one round trip. Each function still sees the writes
 * of those before it (as if they had run one after another), and one that throws is left out
 * alone, its writes discarded, as atomically() promises.
 *
 * A batch stays within one etcd transaction's limits (etcd's --max-txn-ops, 128 by default, bounds
 * both the compares and the writes); a function that alone goes beyond them runs alone, and etcd
 * refuses it if it must.
 */
import { kmsError } from '../../errors.js';
import type { StoreTxnView } from './store.js';

/** A key read for a batch: its value and the mod revision the commit compares against (0: absent). */
export interface Read {
  value: unknown;
  modRevision: bigint;
  /** From the store's cache (or guessed absent), not read from etcd: only the commit's compare checks it. */
  guessed?: boolean;
}

export type ReadFn = (key: string) => Promise<Read>;
/** The store's answer for a key without a round trip: what it has cached, else absent. */
export type GuessFn = (key: string) => Read;
/** Commits `writes` (undefined: delete) if every key in `reads` is still at its revision. */
export type CommitFn = (reads: Map<string, Read>, writes: Map<string, unknown>) => Promise<boolean>;

/** etcd's default --max-txn-ops, less one for a blind batch's always-true compare. */
export const MAX_TXN_OPS = 127;
/** Conflicting commits by other replicas before a batch gives up (each re-reads what changed). */
const MAX_ATTEMPTS = 32;

interface Entry {
  fn: (tx: StoreTxnView) => unknown;
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

type Outcome = { ok: true; value: unknown } | { ok: false; error: unknown };

/** The function needs a key the batch has not read yet: read it, then run the function again. */
class NeedKey {
  constructor(readonly key: string) {}
}

const FULL = Symbol('batch full');

export class GroupCommit {
  #queue: Entry[] = [];
  #draining = false;

  /**
   * With `guess`, a batch first runs on guessed reads and no round trip but the commit, whose
   * compares (every key read, at the mod revision guessed) check every guess; only when one was
   * wrong does the batch read its keys from etcd and run again. A batch with guesses and no
   * writes still commits its compares, so no answer rests on an unchecked guess.
   */
  constructor(
    private readonly read: ReadFn,
    private readonly commit: CommitFn,
    private readonly guess?: GuessFn,
  ) {}

  run<T>(fn: (tx: StoreTxnView) => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#queue.push({ fn, resolve: resolve as (value: unknown) => void, reject });
      if (!this.#draining) {
        this.#draining = true;
        // Let the calls made in this turn of the event loop join the first batch.
        setImmediate(() => void this.#drain());
      }
    });
  }

  async #drain(): Promise<void> {
    try {
      while (this.#queue.length > 0) {
        const entries = this.#queue;
        this.#queue = [];
        await this.#runBatch(entries);
      }
    } finally {
      this.#draining = false;
    }
  }

  async #runBatch(entries: Entry[]): Promise<void> {
    const reads = new Map<string, Read>();
    let batch = entries;
    for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
      const writes = new Map<string, unknown>();
      const outcomes: Outcome[] = [];
      for (const entry of batch) {
        const outcome = await this.#runEntry(entry, reads, writes, outcomes.length === 0);
        if (outcome === FULL) break;
        outcomes.push(outcome);
      }
      if (outcomes.length < batch.length) {
        // What did not fit goes first into the next batch, in its order.
        this.#queue.unshift(...batch.slice(outcomes.length));
        batch = batch.slice(0, outcomes.length);
      }
      let committed: boolean;
      try {
        const guessed = [...reads.values()].some((r) => r.guessed === true);
        committed = (writes.size === 0 && !guessed) || (await this.commit(reads, writes));
      } catch (err) {
        for (const entry of batch) entry.reject(err);
        return;
      }
      if (committed) {
        outcomes.forEach((o, i) => {
          if (o.ok) batch[i]?.resolve(o.value);
          else batch[i]?.reject(o.error);
        });
        return;
      }
      // Another replica changed what we read (or a guess was wrong): read it all from etcd and
      // run the batch again.
      try {
        const fresh = await Promise.all(
          [...reads.keys()].map(async (key) => [key, await this.read(key)] as const),
        );
        for (const [key, read] of fresh) reads.set(key, read);
      } catch (err) {
        for (const entry of batch) entry.reject(err);
        return;
      }
    }
    const err = kmsError(
      'REGISTRY_UNAVAILABLE',
      'the etcd registry stayed contended (too many conflicting writes); retry',
    );
    for (const entry of batch) entry.reject(err);
  }

  /**
   * Runs one function against the batch so far; its writes join the batch if it returns and they
   * fit. `first`: the batch's first function runs whatever its size.
   */
  async #runEntry(
    entry: Entry,
    reads: Map<string, Read>,
    writes: Map<string, unknown>,
    first: boolean,
  ): Promise<Outcome | typeof FULL> {
    const readHere: string[] = [];
    for (;;) {
      const local = new Map<string, unknown>();
      let value: unknown;
      try {
        value = entry.fn(batchView(reads, writes, local));
      } catch (thrown) {
        if (!(thrown instanceof NeedKey)) return { ok: false, error: thrown };
        if (!first && reads.size >= MAX_TXN_OPS) return leave(reads, readHere);
        try {
          reads.set(thrown.key, this.guess?.(thrown.key) ?? (await this.read(thrown.key)));
        } catch (err) {
          return { ok: false, error: err };
        }
        readHere.push(thrown.key);
        continue;
      }
      let added = 0;
      for (const key of local.keys()) if (!writes.has(key)) added++;
      if (!first && writes.size + added > MAX_TXN_OPS) return leave(reads, readHere);
      for (const [key, v] of local) writes.set(key, v);
      return { ok: true, value };
    }
  }
}

/** A function left for the next batch takes its reads with it (they would be compared for nothing). */
function leave(reads: Map<string, Read>, readHere: string[]): typeof FULL {
  for (const key of readHere) reads.delete(key);
  return FULL;
}

/** Reads see this function's writes, then the batch's earlier ones, then what the batch read. */
function batchView(
  reads: Map<string, Read>,
  writes: Map<string, unknown>,
  local: Map<string, unknown>,
): StoreTxnView {
  return {
    get(key) {
      if (local.has(key)) return local.get(key);
      if (writes.has(key)) return writes.get(key);
      const read = reads.get(key);
      if (read === undefined) throw new NeedKey(key);
      return read.value;
    },
    put(key, value) {
      local.set(key, value);
    },
    delete(key) {
      local.set(key, undefined);
    },
  };
}
