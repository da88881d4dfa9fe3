import type { DekRecord } from '../dek-versions.js';

/**
 * Decoded DEK records for the encrypt/decrypt hot path, bounded, with second-chance (CLOCK)
 * eviction over a ring of slots: a hit sets a flag, a miss past capacity takes the first slot
 * the hand finds unflagged. The registry keeps it exact itself: every write goes through its
 * `#transact`, which stores the new record in the cache as it stages it and, after the commit,
 * drops any entry that a concurrent read may have filled with the pre-commit value; changes the
 * store reports from elsewhere drop their entries.
 * (lmdb's own `cache` option did the same job but cost ~15% of a KEK rotation in bookkeeping. The
 * FIFO this replaces evicted busy keys as readily as idle ones, and found its oldest entry with
 * `keys().next()`, which walks every deleted slot at the front of a Map: with 100,000 thread keys
 * that lookup and the LMDB reads of the keys it evicted were ~20% of the main thread.)
 */
export class DekRecordCache {
  readonly #slotOf = new Map<string, number>();
  readonly #keyIds: (string | undefined)[];
  readonly #records: (DekRecord | undefined)[];
  readonly #referenced: Uint8Array;
  readonly #capacity: number;
  #used = 0;
  #hand = 0;

  constructor(capacity: number) {
    this.#capacity = Math.max(1, capacity);
    this.#keyIds = new Array(this.#capacity).fill(undefined);
    this.#records = new Array(this.#capacity).fill(undefined);
    this.#referenced = new Uint8Array(this.#capacity);
  }

  get size(): number {
    return this.#slotOf.size;
  }

  get(keyId: string): DekRecord | undefined {
    const slot = this.#slotOf.get(keyId);
    if (slot === undefined) return undefined;
    this.#referenced[slot] = 1;
    return this.#records[slot];
  }

  set(keyId: string, record: DekRecord): void {
    let slot = this.#slotOf.get(keyId);
    if (slot === undefined) {
      slot = this.#freeSlot();
      this.#slotOf.set(keyId, slot);
      this.#keyIds[slot] = keyId;
    }
    this.#records[slot] = record;
  }

  /** A slot for a new entry: one never used, one deleted, or the CLOCK hand's victim. */
  #freeSlot(): number {
    if (this.#used < this.#capacity) return this.#used++;
    for (;;) {
      const at = this.#hand;
      this.#hand = at + 1 === this.#capacity ? 0 : at + 1;
      const keyId = this.#keyIds[at];
      if (keyId !== undefined && this.#referenced[at] === 1) {
        this.#referenced[at] = 0;
        continue;
      }
      if (keyId !== undefined) this.#slotOf.delete(keyId);
      this.#keyIds[at] = undefined;
      this.#records[at] = undefined;
      return at;
    }
  }

  delete(keyId: string): void {
    const slot = this.#slotOf.get(keyId);
    if (slot === undefined) return;
    this.#slotOf.delete(keyId);
    this.#keyIds[slot] = undefined;
    this.#records[slot] = undefined;
    this.#referenced[slot] = 0;
  }

  clear(): void {
    this.#slotOf.clear();
    this.#keyIds.fill(undefined);
    this.#records.fill(undefined);
    this.#referenced.fill(0);
    this.#used = 0;
    this.#hand = 0;
  }
}
