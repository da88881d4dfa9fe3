/**
 * The end of a deletion window (destroyDek with `deletionWindow`, like AWS KMS's key deletion
 * waiting period): a periodic sweep destroys every key whose window has ended. It also runs at
 * start, so a window that ended while the KMS was down ends at the next start.
 *
 * Each check is one read of the first page of the registry's pending-deletion index (soonest due
 * first), whatever the number of keys. In a cluster a replica that finds something due sweeps
 * under the deletion lock and the others skip that check, so replicas do not all write the same
 * destructions to etcd (a race would be harmless: a destroyed key is no change).
 */
import { toCodedError } from '../errors.js';
import type { Logger } from '../log.js';
import type { Registry } from './registry/index.js';
import type { KmsClock } from './rotation-schedule.js';

/** The cluster lock a sweep runs under (StoreCluster). */
export const DELETION_LOCK = 'deletion-sweep';
/** Keys destroyed per read of the index. */
const PAGE = 100;
/** How often a sweep looks, unless the clock says otherwise (more often for short windows). */
const DEFAULT_CHECK_MS = 60_000;

export function sweepEveryMs(windowMs: number): number {
  return windowMs > 0 ? Math.min(DEFAULT_CHECK_MS, Math.max(1000, windowMs / 10)) : DEFAULT_CHECK_MS;
}

export interface SweepDeps {
  clock: KmsClock;
  /** The configured deletion window (keys made pending under another one are swept all the same). */
  windowMs: number;
  registry: Pick<Registry, 'dueDeletions' | 'cluster'>;
  /** Destroys the key if its window has ended; returns the versions destroyed (none: no change). */
  destroyIfDue(keyId: string): Promise<number[]>;
  log: Logger;
}

export class DeletionSweep {
  readonly #deps: SweepDeps;
  #timer: NodeJS.Timeout | null = null;
  #running: Promise<void> | null = null;

  constructor(deps: SweepDeps) {
    this.#deps = deps;
  }

  start(): void {
    const every = this.#deps.clock.checkEveryMs ?? sweepEveryMs(this.#deps.windowMs);
    this.#timer = setInterval(() => void this.check(), every);
    this.#timer.unref();
    void this.check();
  }

  /** Stops checking; resolves once a sweep under way has finished. */
  async stop(): Promise<void> {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
    await this.#running;
  }

  /** Sweeps unless a sweep is running already; resolves when it is done. Never rejects. */
  check(): Promise<void> {
    this.#running ??= this.#sweep()
      .catch((err) => {
        this.#deps.log.error(
          { code: toCodedError(err).code },
          'the deletion sweep failed; it runs again at the next check',
        );
      })
      .finally(() => {
        this.#running = null;
      });
    return this.#running;
  }

  async #sweep(): Promise<void> {
    const { registry, clock } = this.#deps;
    for (;;) {
      const due = await registry.dueDeletions(clock.now(), PAGE);
      if (due.length === 0) return;
      const cluster = registry.cluster;
      if (cluster !== undefined && !(await cluster.tryLock(DELETION_LOCK))) return;
      let destroyed = 0;
      try {
        for (const keyId of due) {
          if ((await this.#deps.destroyIfDue(keyId)).length > 0) destroyed++;
        }
      } finally {
        await cluster?.unlock(DELETION_LOCK);
      }
      this.#deps.log.info({ destroyed }, 'deletion windows ended: keys destroyed');
      // A full page: there may be more due. One that destroyed nothing would only be read again.
      if (due.length < PAGE || destroyed === 0) return;
    }
  }
}
