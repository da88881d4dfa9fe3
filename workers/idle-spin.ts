/**
 * Spin-then-park for a crypto worker. After a task, a worker with nothing queued would park, and
 * the next task would pay for waking it: 15-70 µs on this kind of VM, more than the op itself. So
 * a worker that just finished spins for a short budget, watching the count of tasks posted to it,
 * and only then parks. It stays out of the way of the rest of the process:
 * - at most one worker spins at a time, and only while no more than `cores - 2` other workers
 *   are busy, so a core is always left for the main thread;
 * - after a few spins in a row that found nothing, it stops spinning until traffic again arrives
 *   within the budget (adaptive: idle processes do not burn CPU).
 * The spin runs from setImmediate, after Piscina has posted the task's result.
 */
import { threadId } from 'node:worker_threads';
import { IDLE_SPIN_WORKER_SLOTS, IdleSpinSlot, type WorkerInit } from '../src/protocol.js';

/** Spins in a row that may find nothing before spinning pauses. */
const MAX_MISSES = 3;

export class IdleSpin {
  readonly #signal: Int32Array;
  readonly #budgetMs: number;
  readonly #maxOtherBusy: number;
  readonly #postedSlot = IdleSpinSlot.posted + (threadId % IDLE_SPIN_WORKER_SLOTS);
  #received = 0;
  #misses = 0;
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
    // A task that came within the budget after the last one shows spinning would have paid.
    if (this.#lastEnd > 0 && this.#now() - this.#lastEnd <= this.#budgetMs) this.#misses = 0;
  }

  taskEnded(): void {
    const otherBusy = Atomics.sub(this.#signal, IdleSpinSlot.busy, 1) - 1;
    this.#lastEnd = this.#now();
    if (this.#misses >= MAX_MISSES || otherBusy > this.#maxOtherBusy || this.#taskWaiting()) return;
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
    this.#misses = found ? 0 : this.#misses + 1;
    this.stats.spins++;
    if (found) this.stats.found++;
  };
}
