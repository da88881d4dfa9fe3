/**
 * Bounded cache of unwrapped keys with second-chance (CLOCK) eviction: a hit only sets a flag,
 * which keeps the hot path to one Map lookup (a strict LRU reorders the Map on every hit, which
 * profiled at ~4% of an encrypt). Every key that leaves the cache (eviction, delete, clear) is
 * zeroed, so an unwrapped DEK lives in exactly one buffer for as long as it is cached.
 */
interface Entry {
  key: Buffer;
  referenced: boolean;
}

export class KeyCache {
  readonly #capacity: number;
  // Insertion order is the clock hand's order: the first entry is the next eviction candidate.
  readonly #entries = new Map<string, Entry>();

  constructor(capacity: number) {
    this.#capacity = Math.max(1, capacity);
  }

  get(id: string): Buffer | undefined {
    const entry = this.#entries.get(id);
    if (entry === undefined) return undefined;
    entry.referenced = true;
    return entry.key;
  }

  /** Takes ownership of `key`. */
  set(id: string, key: Buffer): void {
    const previous = this.#entries.get(id);
    if (previous !== undefined) {
      if (previous.key !== key) previous.key.fill(0);
      this.#entries.delete(id);
    }
    this.#entries.set(id, { key, referenced: false });
    while (this.#entries.size > this.#capacity) this.#evictOne();
  }

  #evictOne(): void {
    for (const [id, entry] of this.#entries) {
      this.#entries.delete(id);
      if (entry.referenced) {
        // Second chance: move to the back, unmarked.
        entry.referenced = false;
        this.#entries.set(id, entry);
      } else {
        entry.key.fill(0);
        return;
      }
    }
  }

  /** Drops and zeroes every entry whose id starts with `prefix`. */
  deletePrefix(prefix: string): void {
    for (const [id, entry] of this.#entries) {
      if (id.startsWith(prefix)) {
        entry.key.fill(0);
        this.#entries.delete(id);
      }
    }
  }

  clear(): void {
    for (const entry of this.#entries.values()) entry.key.fill(0);
    this.#entries.clear();
  }
}
