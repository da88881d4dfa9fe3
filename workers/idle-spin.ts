/**
 * Spin-then-park for a crypto worker. After a task, a worker with nothing queued would park, and
 * the next task would pay for waking it: 15-70 µs on this kind of VM, more than the op itself. So
 * a worker that just finished spins for a short budget, watching the count of tasks posted to it,
 * and only then parks. It stays out of the way of the rest of the process:
 * - at most one worker spins at a time, and only while no more than `cores - 2` other workers
 *   are busy, so a core is always left for the main thread;
 * - it spins only while its recent idle gaps (a moving average) are shorter than the budget, so a
 *   spin is likely to pay: sparse traffic, or a main thread too busy to feed it quickly (a loaded
 *   server sharing its cores with other work), turns spinning off by itself.
 * The spin runs from setImmediate, after Piscina has posted the task's result.
 */
import { threadId } from 'node:worker_threads';
import { IDLE_SPIN_WORKER_SLOTS, IdleSpinSlot, type WorkerInit } from '../src/worker-abi/index.js';

/** Weight of the newest idle gap in the moving average. */
const GAP_WEIGHT = 1 / 4;
/** A gap counts as at most this many budgets, so one long pause does not stop spinning for long. */
const GAP_CAP = 4;

export class IdleSpin {
  readonly #signal: Int32Array;
  readonly #budgetMs: number;
  readonly #maxOtherBusy: number;
  readonly #postedSlot = IdleSpinSlot.posted + (threadId % IDLE_SPIN_WORKER_SLOTS);
  #received = 0;
  /** Moving average of the time from the end of one task to the start of the next (ms). */
  #gapMs = 0;
  #lastEnd = 0;
  /** Spins run, and how many of them found a task (for tests and diagnostics). */
  readonly stats = { spins: 0, found: 0 };

  readonly #now: () => number;

  /** `now` (ms) is replaceable so that tests control time instead of racing it. */
  constructor(config: NonNullable<WorkerInit['idleSpin']>, now: () => number = () => performance.now()) {
    this.#now = now;
    this.#signal = new Int32Array(config.signal);
    this.#budgetMs = config.budgetUs / 1000;
    this.#maxOtherBusy = config.cores - 2;
  }

  taskStarted(): void {
    this.#received++;
    Atomics.add(this.#signal, IdleSpinSlot.busy, 1);
    if (this.#lastEnd > 0) {
      const gap = Math.min(this.#now() - this.#lastEnd, GAP_CAP * this.#budgetMs);
      this.#gapMs += (gap - this.#gapMs) * GAP_WEIGHT;
    }
  }

  taskEnded(): void {
    const otherBusy = Atomics.sub(this.#signal, IdleSpinSlot.busy, 1) - 1;
    this.#lastEnd = this.#now();
    if (this.#gapMs > this.#budgetMs || otherBusy > this.#maxOtherBusy || this.#taskWaiting()) return;
    setImmediate(this.#spin);
  }

  /** A task already posted to this worker that it has not started (posted counts wrap together). */
  #taskWaiting(): boolean {
    return Atomics.load(this.#signal, this.#postedSlot) !== (this.#received | 0);
  }

  readonly #spin = (): void => {
    if (Atomics.compareExchange(this.#signal, IdleSpinSlot.spinner, 0, threadId) !== 0) return;
    const deadline = this.#now() + this.#budgetMs;
    let found = false;
    while (!(found = this.#taskWaiting()) && this.#now() < deadline) {
      // Busy wait by design: the point is to keep this vCPU from being descheduled.
    }
    Atomics.store(this.#signal, IdleSpinSlot.spinner, 0);
    this.stats.spins++;
    if (found) this.stats.found++;
  };
}
