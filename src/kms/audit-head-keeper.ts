/**
 * Keeps the registry's audit head in step with the log (the linking scheme is in src/audit-link.ts):
 * the stream heads that workers report after each task are saved once the group fsync has put
 * them on disk, and a clean stop seals them. The registry therefore never claims a line the log
 * may not hold, and `audit verify` can tell a log whose sessions, streams or tail were removed.
 */

import type { StreamCheckpoint } from '../audit-checkpoint.js';
import {
  type AuditHeadRecord,
  formatHeads,
  linkFields,
  nextSession,
  type StreamHead,
} from '../audit-link.js';
import type { Logger } from '../log.js';
import { type FlushHook, LATER } from './audit-file.js';
import type { Registry } from './registry/index.js';

/**
 * Saves at most this often: after a crash the head may lag the log by about this much, and the
 * registry is not written at every group fsync (50 ms by default).
 */
const MIN_SAVE_INTERVAL_MS = 250;

export class AuditHeadKeeper {
  readonly #registry: Registry;
  readonly #log: Logger;
  readonly #session: AuditHeadRecord;
  readonly #heads = new Map<string, StreamHead>();
  readonly #checkpoints = new Map<string, StreamCheckpoint>();
  /** Bumped by every report; saves are skipped when nothing changed since the last one. */
  #reported = 0;
  #saved = -1;
  #sealed = false;
  #savedAt = 0;

  constructor(registry: Registry, log: Logger) {
    this.#registry = registry;
    this.#log = log;
    this.#session = nextSession(registry.auditHead());
  }

  /** The fields the first line of each of this session's streams carries. */
  get linkFields(): string {
    return linkFields(this.#session.session, this.#session.links);
  }

  /** Records this session in the registry; call before its first line is written. Throws on failure. */
  begin(): void {
    this.#registry.putAuditHead(this.#session);
  }

  /** A worker's stream head (and last checkpoint) after a task that appended lines (not yet durable). */
  report(head: StreamHead | undefined, checkpoint?: StreamCheckpoint): void {
    if (head === undefined) return;
    this.#heads.set(head.s, head);
    if (checkpoint !== undefined) this.#checkpoints.set(checkpoint.s, checkpoint);
    this.#reported++;
  }

  /** Reports since the KMS started: the checkpoint rounds skip a KMS that wrote nothing since the last. */
  get reported(): number {
    return this.#reported;
  }

  /** For AuditFile.onFlush: captures the heads now; saves them once the flush is on disk. */
  beforeFlush: FlushHook = () => {
    if (this.#sealed || this.#saved === this.#reported) return null;
    const now = Date.now();
    // Asked again until saved, so a burst's last heads are saved even if the KMS then goes idle.
    if (now - this.#savedAt < MIN_SAVE_INTERVAL_MS) return LATER;
    this.#savedAt = now;
    const reported = this.#reported;
    const heads = [...this.#heads.values()];
    const checkpoints = this.#checkpointsNow();
    return () => {
      // A flush that completes after the stop must not overwrite the sealed head.
      if (this.#sealed || reported <= this.#saved) return;
      this.#saved = reported;
      this.#save({ ...this.#session, heads, sealed: false, ...checkpoints });
    };
  };

  /** The stop line's `heads` field: every stream's head as the stop line is written. */
  stopHeads(): string {
    return formatHeads(this.#heads.values());
  }

  /** After the stop line is on disk: the session's streams end where their heads now are. */
  seal(): void {
    this.#sealed = true;
    this.#save({
      ...this.#session,
      heads: [...this.#heads.values()],
      sealed: true,
      ...this.#checkpointsNow(),
    });
  }

  /** The `checkpoints` field to save, if any stream has one yet. */
  #checkpointsNow(): { checkpoints?: StreamCheckpoint[] } {
    return this.#checkpoints.size === 0 ? {} : { checkpoints: [...this.#checkpoints.values()] };
  }

  #save(head: AuditHeadRecord): void {
    try {
      this.#registry.putAuditHead(head);
    } catch (err) {
      this.#log.warn(
        { err: String(err) },
        'could not save the audit head; audit verify will not see the newest lines as required',
      );
    }
  }
}
