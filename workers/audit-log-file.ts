/**
 * A worker's handle on the audit log: appends its signed blocks and follows the main thread to a
 * new live file (rollover, SIGHUP). Worker-only. After a failed write or open, `failure` names it
 * and every later append is refused: no key use without its audit line (fail closed).
 */
import fs from 'node:fs';
import type { SealedBlock } from './audit-stream.js';
import { WorkerFault } from './fault.js';

export class AuditLogFile {
  #fd = -1;
  /** The generation of the live file `#fd` was opened on. */
  #fdGeneration = 0;
  readonly #generation: Int32Array | null;
  #failure: string | null = null;

  constructor(
    private readonly file: string | null,
    /** Bumped by the main thread (Atomics) when it opens a new live file; null with audit off. */
    generation: SharedArrayBuffer | null,
    private readonly fsyncEachWrite: boolean,
  ) {
    this.#generation = generation === null ? null : new Int32Array(generation);
  }

  /** Why the log cannot be written, once a write or open failed; else null. */
  get failure(): string | null {
    return this.#failure;
  }

  /**
   * Appends a signed block before the task's results are released. O_APPEND and one write per
   * block keep blocks whole when several workers append; each worker's own stream stays in order
   * because a worker runs one task at a time.
   */
  append(block: SealedBlock): void {
    if (this.#failure !== null) {
      throw new WorkerFault('AUDIT_WRITE_FAILED', `audit log unavailable (${this.#failure})`);
    }
    try {
      if (this.#fd < 0) {
        if (this.file === null) throw new WorkerFault('INTERNAL', 'audit lines without an audit file');
        this.#fd = fs.openSync(this.file, 'a', 0o600);
      }
      let written = 0;
      while (written < block.length) {
        written += fs.writeSync(this.#fd, block.buffer, written, block.length - written);
      }
      if (this.fsyncEachWrite) fs.fdatasyncSync(this.#fd);
    } catch (err) {
      this.#failure = (err as NodeJS.ErrnoException).code ?? 'write error';
      throw new WorkerFault(
        'AUDIT_WRITE_FAILED',
        `audit log write failed (${this.#failure}); operation refused`,
      );
    }
  }

  /**
   * Before a task adds lines: (re)opens the log if the main thread started a new live file since
   * the last open, so this task's block goes there; `switched` is told when an open file was
   * replaced (the stream's first line in the new file names the MAC its chain goes on from). A
   * block never spans files: a task still writing to the old file was counted by the main thread,
   * which fsyncs that file until it ends.
   */
  follow(switched: () => void): void {
    if (this.#generation === null || this.file === null || this.#failure !== null) return;
    const generation = Atomics.load(this.#generation, 0);
    if (this.#fd >= 0 && generation === this.#fdGeneration) return;
    try {
      const fd = fs.openSync(this.file, 'a', 0o600);
      if (this.#fd >= 0) {
        fs.closeSync(this.#fd);
        switched();
      }
      this.#fd = fd;
      this.#fdGeneration = generation;
    } catch (err) {
      this.#failure = (err as NodeJS.ErrnoException).code ?? 'open error';
    }
  }

  close(): void {
    if (this.#fd >= 0) {
      fs.closeSync(this.#fd);
      this.#fd = -1;
    }
  }
}
