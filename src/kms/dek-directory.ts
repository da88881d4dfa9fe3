/**
 * The main thread's side of the key directory (src/worker-abi/key-directory.ts): which entry holds
 * which DEK version, and when an entry may be given to another. An entry is reused only once every
 * task that named it has settled, so a worker never finds an entry changed under an op; among the
 * reusable ones, second-chance (CLOCK) order keeps the busy threads' keys in place.
 */
import { type KeyDirectoryInit, KeyDirectoryView } from '../worker-abi/key-directory.js';
import type { DekRef } from '../worker-abi/tasks.js';

export class DekDirectory {
  readonly init: KeyDirectoryInit;
  readonly #view: KeyDirectoryView;
  /** DekRefs are cached per record version, so identity finds the entry of a version seen before. */
  readonly #entryOf = new WeakMap<DekRef, number>();
  readonly #refs: (DekRef | undefined)[];
  readonly #threadIds: (string | undefined)[];
  readonly #generations: Int32Array;
  /** Number of the last task that named the entry. */
  readonly #lastTask: Float64Array;
  readonly #referenced: Uint8Array;
  readonly #free: number[] = [];
  #used = 0;
  #hand = 0;

  constructor(init: KeyDirectoryInit) {
    this.init = init;
    this.#view = new KeyDirectoryView(init);
    const n = init.capacity;
    this.#refs = new Array(n).fill(undefined);
    this.#threadIds = new Array(n).fill(undefined);
    this.#generations = new Int32Array(n);
    this.#lastTask = new Float64Array(n).fill(-1);
    this.#referenced = new Uint8Array(n);
  }

  /**
   * The entry holding `ref` (with `threadId`, for its audit lines) for task number `task`, written
   * now if it is not there yet; -1 when no entry can take it (every one named by a task in flight,
   * or ids too long for an entry): the op then carries its DekRef as before. `oldestInFlight`: the
   * lowest number of a task not yet settled.
   */
  entryFor(ref: DekRef, threadId: string | undefined, task: number, oldestInFlight: number): number {
    let index = this.#entryOf.get(ref);
    if (index === undefined) {
      index = this.#claim(oldestInFlight);
      if (index < 0) return -1;
      const generation = ((this.#generations[index] as number) + 1) | 0 || 1;
      if (!this.#view.write(index, generation, ref, threadId)) {
        this.#free.push(index);
        return -1;
      }
      this.#generations[index] = generation;
      this.#refs[index] = ref;
      this.#threadIds[index] = threadId;
      this.#entryOf.set(ref, index);
    } else if (this.#threadIds[index] !== threadId) {
      return -1;
    }
    this.#referenced[index] = 1;
    this.#lastTask[index] = task;
    return index;
  }

  generation(index: number): number {
    return this.#generations[index] as number;
  }

  /** A free entry, or one no task in flight names (its old mapping dropped); -1 if none. */
  #claim(oldestInFlight: number): number {
    const free = this.#free.pop();
    if (free !== undefined) return free;
    const capacity = this.init.capacity;
    if (this.#used < capacity) return this.#used++;
    // Each entry is looked at most twice (once to clear its flag): a bounded sweep.
    for (let budget = 2 * capacity; budget > 0; budget--) {
      const at = this.#hand;
      this.#hand = at + 1 === capacity ? 0 : at + 1;
      if ((this.#lastTask[at] as number) >= oldestInFlight) continue;
      if (this.#referenced[at] === 1) {
        this.#referenced[at] = 0;
        continue;
      }
      const old = this.#refs[at];
      if (old !== undefined) this.#entryOf.delete(old);
      this.#refs[at] = undefined;
      return at;
    }
    return -1;
  }
}
