/**
 * Bounded cache of unwrapped keys with second-chance (CLOCK) eviction: a hit only sets a flag,
 * which keeps the hot path to one Map lookup (a strict LRU reorders the Map on every hit, which
 * profiled at ~4% of an encrypt). The keys are slots of the worker's locked KeyArena; every key that
 * leaves the cache (eviction, delete, clear) goes back to it zeroed, so an unwrapped DEK lives in
 * exactly one place for as long as it is cached.
 *
 * Keys used by the running task are pinned (beginTask): a batch holds the keys it resolved until
 * it ends, so eviction must not zero, and the arena must not hand out again, a slot a later op of
 * the same batch will read. The cache may exceed its capacity during such a task; endTask trims it.
 */
import type { KeyArena } from './key-arena.js';

/** A cached key, which a holder may keep to skip the lookup while `live` (see KeyCache.use). */
export interface CachedKey {
  readonly key: Buffer;
  /** False once the key left the cache (zeroed, its slot free for another key). */
  live: boolean;
  /** The key id it belongs to (for evict), and a tag get() must match (a directory generation). */
  keyId: string;
  tag: number;
  referenced: boolean;
  /** The task that last used it: pinned while that task runs. */
  task: number;
}

/** `keyId#version` for a key sent as a DekRef; a key directory entry's index for one named by it. */
export type CacheId = string | number;

export class KeyCache {
  readonly #capacity: number;
  readonly #arena: KeyArena;
  // Insertion order is the clock hand's order: the first entry is the next eviction candidate.
  readonly #entries = new Map<CacheId, CachedKey>();
  /** The running task's number; 0 between tasks, when nothing is pinned. */
  #task = 0;
  #tasks = 0;

  constructor(capacity: number, arena: KeyArena) {
    this.#capacity = Math.max(1, capacity);
    this.#arena = arena;
  }

  get size(): number {
    return this.#entries.size;
  }

  beginTask(): void {
    this.#task = ++this.#tasks;
  }

  endTask(): void {
    this.#task = 0;
    this.#trim();
  }

  /** The key cached as `id` with `tag` (an entry under another tag is stale: set() replaces it). */
  get(id: CacheId, tag = 0): Buffer | undefined {
    return this.lookup(id, tag)?.key;
  }

  /** get(), as the cached entry a holder can keep and pass to use() instead of looking it up again. */
  lookup(id: CacheId, tag = 0): CachedKey | undefined {
    const entry = this.#entries.get(id);
    if (entry === undefined || entry.tag !== tag) return undefined;
    entry.referenced = true;
    entry.task = this.#task;
    return entry;
  }

  /** A kept entry's key, used (and pinned) as get() would; undefined once it left the cache. */
  use(entry: CachedKey): Buffer | undefined {
    if (!entry.live) return undefined;
    entry.referenced = true;
    entry.task = this.#task;
    return entry.key;
  }

  /** Takes ownership of `key`, an arena slot, as the key of `keyId`; returns its entry. */
  set(id: CacheId, key: Buffer, keyId: string, tag = 0): CachedKey {
    const previous = this.#entries.get(id);
    if (previous !== undefined) {
      previous.live = false;
      if (previous.key !== key) this.#arena.free(previous.key);
      this.#entries.delete(id);
    }
    const entry: CachedKey = { key, live: true, keyId, tag, referenced: false, task: this.#task };
    this.#entries.set(id, entry);
    this.#trim();
    return entry;
  }

  #trim(): void {
    while (this.#entries.size > this.#capacity) if (!this.#evictOne()) return;
  }

  /** Evicts one unpinned entry; false when every entry is pinned by the running task. */
  #evictOne(): boolean {
    // Each entry is looked at most twice (once to clear its flag): a bounded sweep.
    let budget = this.#entries.size * 2;
    for (const [id, entry] of this.#entries) {
      if (budget-- === 0) return false;
      this.#entries.delete(id);
      if (entry.referenced || (this.#task !== 0 && entry.task === this.#task)) {
        // Second chance (or pinned): move to the back, unmarked.
        entry.referenced = false;
        this.#entries.set(id, entry);
      } else {
        entry.live = false;
        this.#arena.free(entry.key);
        return true;
      }
    }
    return false;
  }

  /** Drops and zeroes every cached version of `keyId`. */
  deleteKey(keyId: string): void {
    for (const [id, entry] of this.#entries) {
      if (entry.keyId === keyId) {
        entry.live = false;
        this.#arena.free(entry.key);
        this.#entries.delete(id);
      }
    }
  }

  clear(): void {
    for (const entry of this.#entries.values()) {
      entry.live = false;
      this.#arena.free(entry.key);
    }
    this.#entries.clear();
  }
}
