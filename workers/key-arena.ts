/**
 * Locked memory for key bytes. Every key a worker holds (the root keys, KEK versions, unwrapped
 * DEKs) lives in a fixed 32-byte slot of a few large `sodium_malloc` regions: guarded pages,
 * excluded from core dumps, and `mlock`ed so they never reach swap. One region per many keys, not
 * one per key: each sodium_malloc maps its own guard pages (4 KiB locked per 32-byte key), and
 * tens of thousands of them exhaust the kernel's map count and abort the process.
 *
 * The first region is sized for the key cache's capacity plus a reserve; should a task need more
 * slots at once (every key of a large batch is held until the task ends), one more region of
 * GROWTH_SLOTS is mapped. Freed slots are zeroed with sodium_memzero at once.
 */
import sodium from 'sodium-native';
import { KEY_BYTES } from '../src/format.js';

/** Slots beyond the cache: root keys, KEK versions, keys being generated or rewrapped. */
export const RESERVE_SLOTS = 1024;
const GROWTH_SLOTS = 1024;

export interface KeyMemoryStatus {
  /** Bytes of key slots mlock'ed. */
  lockedBytes: number;
  /** Bytes of key slots that could not be locked (RLIMIT_MEMLOCK): still guarded, but swappable. */
  unlockedBytes: number;
}

export class KeyArena {
  readonly #regions: Buffer[] = [];
  /** Slot views not in use, each already zero. */
  readonly #free: Buffer[] = [];
  /** Next never-used slot of the newest region. */
  #next = 0;
  #lockedBytes = 0;
  #unlockedBytes = 0;

  constructor(slots: number) {
    this.#map(slots);
  }

  #map(slots: number): void {
    const region = sodium.sodium_malloc(slots * KEY_BYTES);
    // sodium_malloc tries mlock itself but ignores a refusal; asking again tells whether it held.
    try {
      sodium.sodium_mlock(region);
      this.#lockedBytes += region.length;
    } catch {
      this.#unlockedBytes += region.length;
    }
    sodium.sodium_memzero(region);
    this.#regions.push(region);
    this.#next = 0;
  }

  /** A zeroed 32-byte slot; the caller gives it back with free(). */
  alloc(): Buffer {
    const reused = this.#free.pop();
    if (reused !== undefined) return reused;
    let region = this.#regions[this.#regions.length - 1] as Buffer;
    if (this.#next + KEY_BYTES > region.length) {
      this.#map(GROWTH_SLOTS);
      region = this.#regions[this.#regions.length - 1] as Buffer;
    }
    const slot = region.subarray(this.#next, this.#next + KEY_BYTES);
    this.#next += KEY_BYTES;
    return slot;
  }

  /** Zeroes a slot and takes it back. */
  free(slot: Buffer): void {
    sodium.sodium_memzero(slot);
    this.#free.push(slot);
  }

  /** A slot holding a copy of `bytes` (32 of them); the source is not touched. */
  copyOf(bytes: Uint8Array): Buffer {
    const slot = this.alloc();
    slot.set(bytes);
    return slot;
  }

  status(): KeyMemoryStatus {
    return { lockedBytes: this.#lockedBytes, unlockedBytes: this.#unlockedBytes };
  }

  /** Zeroes every slot, whoever holds it: the worker's zeroize, after which no key is in use. */
  zeroAll(): void {
    for (const region of this.#regions) sodium.sodium_memzero(region);
  }
}
