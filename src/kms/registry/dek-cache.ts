import type { DekRecord } from '../dek-versions.js';

/**
 * Decoded DEK records for the encrypt/decrypt hot path (FIFO-bounded). The registry keeps it exact
 * itself: every write goes through its `#transact`, which stores the new record in the cache as it
 * stages it and, after the commit, drops any entry that a concurrent read may have filled with the
 * pre-commit value; changes the store reports from elsewhere drop their entries.
 * (lmdb's own `cache` option did the same job but cost ~15% of a KEK rotation in bookkeeping.)
 */
export class DekRecordCache {
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
