/**
 * Bounded LRU of unwrapped keys. Every key that leaves the cache (eviction, delete, clear) is
 * zeroed, so an unwrapped DEK lives in exactly one buffer for as long as it is cached.
 */
export class KeyCache {
  readonly #capacity: number;
  // Map iteration order is insertion order: the first entry is the least recently used.
  readonly #entries = new Map<string, Buffer>();

  constructor(capacity: number) {
    this.#capacity = Math.max(1, capacity);
  }

  get size(): number {
    return this.#entries.size;
  }

  get(id: string): Buffer | undefined {
    const key = this.#entries.get(id);
    if (key !== undefined) {
      this.#entries.delete(id);
      this.#entries.set(id, key);
    }
    return key;
  }

  /** Takes ownership of `key`. */
  set(id: string, key: Buffer): void {
    const previous = this.#entries.get(id);
    if (previous !== undefined && previous !== key) previous.fill(0);
    this.#entries.delete(id);
    this.#entries.set(id, key);
    while (this.#entries.size > this.#capacity) {
      const [oldestId, oldest] = this.#entries.entries().next().value as [string, Buffer];
      oldest.fill(0);
      this.#entries.delete(oldestId);
    }
  }

  /** Drops and zeroes every entry whose id starts with `prefix`. */
  deletePrefix(prefix: string): void {
    for (const [id, key] of this.#entries) {
      if (id.startsWith(prefix)) {
        key.fill(0);
        this.#entries.delete(id);
      }
    }
  }

  clear(): void {
    for (const key of this.#entries.values()) key.fill(0);
    this.#entries.clear();
  }
}
