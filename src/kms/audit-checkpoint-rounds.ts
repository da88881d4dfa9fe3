/**
 * Keeps idle workers' audit lines covered by a signed checkpoint. A stream checkpoints by itself
 * when a block makes one due (auditCheckpointLines, or auditCheckpointMs since its oldest line not
 * yet covered), but a worker that gets no more tasks would leave its last lines uncovered
 * indefinitely: every auditCheckpointMs, if anything was audited since the last round, each worker
 * is asked to checkpoint (a no-op where nothing is uncovered). At a clean stop the same happens
 * just before the stop line, whose own block is checkpointed at once.
 */
import type { AuditHeadKeeper } from './audit-head-keeper.js';

export interface CheckpointRoundsDeps {
  /** One audit-checkpoint task per worker (CryptoPool.checkpointAll). */
  checkpointAll(): Promise<void>;
  heads: AuditHeadKeeper;
  ms: number;
}

export class AuditCheckpointRounds {
  readonly #deps: CheckpointRoundsDeps;
  #timer: NodeJS.Timeout | null = null;
  /** The keeper's report count at the last round: no round while nothing new was written. */
  #seen = -1;
  #running: Promise<void> | null = null;

  constructor(deps: CheckpointRoundsDeps) {
    this.#deps = deps;
  }

  start(): void {
    this.#timer = setInterval(() => {
      if (this.#running === null && this.#deps.heads.reported !== this.#seen) void this.round();
    }, this.#deps.ms);
    this.#timer.unref();
  }

  /** Asks every worker to checkpoint; resolves once all have answered. */
  round(): Promise<void> {
    this.#seen = this.#deps.heads.reported;
    const running = this.#deps.checkpointAll().finally(() => {
      this.#running = null;
    });
    this.#running = running;
    return running;
  }

  /** Stops the timer; with `lastRound`, runs the last round (before the stop line). */
  async stop(lastRound: boolean): Promise<void> {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
    await this.#running;
    if (lastRound) await this.round();
  }
}
