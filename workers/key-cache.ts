/**
 * Bounded cache of unwrapped keys with second-chance (CLOCK) eviction: a hit only sets a flag,
 * which keeps the hot path to one Map lookup (a strict LRU reorders the Map on every hit, which
 * profiled at ~4% of an encrypt). The clock is a ring of slots with a hand, as in the main
 * thread's DekRecordCache: sweeping the Map itself (deleting and re-inserting each entry given a
 * second chance) was 16% of a worker's busy time with 100,000 keys over a cache of 10,000.
 * The keys are slots of the worker's locked KeyArena; every key that leaves the cache (eviction,
 * delete, clear) goes back to it zeroed, so an unwrapped DEK lives in exactly one place for as
 * long as it is cached.
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
  /** Its id in the cache, and its slot in the clock's ring. */
  readonly id: CacheId;
  readonly slot: number;
}

/** `keyId#version` for a key sent as a DekRef; a key directory entry's index for one named by it. */
export type CacheId = string | number;

export class KeyCache {
  readonly #capacity: number;
  readonly #arena: KeyArena;
  readonly #entries = new Map<CacheId, CachedKey>();
  /** The clock: entries by slot (null: free), swept by the hand. Past capacity only while keys are pinned. */
  #ring: (CachedKey | null)[] = [];
  #hand = 0;
  /** Free slots of the ring; the last one freed (just behind the hand) is reused first. */
  #free: number[] = [];
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
    let slot: number;
    if (previous !== undefined) {
      // The new key takes the old one's place on the clock.
      previous.live = false;
      if (previous.key !== key) this.#arena.free(previous.key);
      slot = previous.slot;
    } else {
      slot = this.#free.pop() ?? this.#ring.push(null) - 1;
    }
    const entry: CachedKey = { key, live: true, keyId, tag, referenced: false, task: this.#task, id, slot };
    this.#entries.set(id, entry);
    this.#ring[slot] = entry;
    this.#trim();
    return entry;
  }

  #trim(): void {
    while (this.#entries.size > this.#capacity) if (!this.#evictOne()) return;
  }

  /** Evicts one unpinned entry; false when every entry is pinned by the running task. */
  #evictOne(): boolean {
    const ring = this.#ring;
    // Each slot is looked at most twice (once to clear its flag): a bounded sweep.
    for (let budget = ring.length * 2; budget > 0; budget--) {
      const at = this.#hand;
      this.#hand = at + 1 === ring.length ? 0 : at + 1;
      const entry = ring[at];
      if (entry === null || entry === undefined) continue;
      if (entry.referenced) entry.referenced = false;
      else if (this.#task === 0 || entry.task !== this.#task) {
        this.#drop(entry);
        return true;
      }
    }
    return false;
  }

  /** Zeroes an entry's key and frees its slot. */
  #drop(entry: CachedKey): void {
    entry.live = false;
    this.#arena.free(entry.key);
    this.#entries.delete(entry.id);
    this.#ring[entry.slot] = null;
    this.#free.push(entry.slot);
  }

  /** Drops and zeroes every cached version of `keyId`. */
  deleteKey(keyId: string): void {
    for (const entry of this.#entries.values()) if (entry.keyId === keyId) this.#drop(entry);
  }

  clear(): void {
    for (const entry of this.#entries.values()) this.#drop(entry);
    this.#ring = [];
    this.#free = [];
    this.#hand = 0;
  }
}
