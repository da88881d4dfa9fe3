/**
 * The audit log file on the main thread: append-only writes of lines the workers signed, with
 * grouped fsync. The main thread never signs (the audit key lives in the workers); it only
 * appends bytes in the order results arrive, which keeps each worker stream in order.
 *
 * Failing closed: once a write fails, every later append fails too, so no key is used without its
 * audit line (the operations whose lines could not be written fail with AUDIT_WRITE_FAILED).
 */
import fs from 'node:fs';
import { kmsError } from '../errors.js';

export const AUDIT_FILE_NAME = 'kms-audit.log';

export class AuditFile {
  readonly path: string;
  #fd: number;
  #dirty = false;
  #failed: string | null = null;
  #timer: NodeJS.Timeout | null = null;
  readonly #fsyncEachWrite: boolean;

  private constructor(filePath: string, fd: number, fsyncMs: number) {
    this.path = filePath;
    this.#fd = fd;
    this.#fsyncEachWrite = fsyncMs === 0;
    if (fsyncMs > 0) {
      this.#timer = setInterval(() => this.#flushAsync(), fsyncMs);
      this.#timer.unref();
    }
  }

  /** Opens (creating, 0600) the log for appending; AUDIT_UNWRITABLE if that is impossible. */
  static open(filePath: string, fsyncMs: number): AuditFile {
    let fd: number;
    try {
      fd = fs.openSync(filePath, 'a', 0o600);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? 'error';
      throw kmsError('AUDIT_UNWRITABLE', `audit log ${filePath} is not writable (${code})`);
    }
    return new AuditFile(filePath, fd, fsyncMs);
  }

  get failed(): boolean {
    return this.#failed !== null;
  }

  /** Appends signed lines; throws AUDIT_WRITE_FAILED (and stays failed) if the bytes cannot be written. */
  append(lines: Uint8Array): void {
    if (this.#failed !== null) throw kmsError('AUDIT_WRITE_FAILED', `audit log unavailable: ${this.#failed}`);
    try {
      let written = 0;
      while (written < lines.length)
        written += fs.writeSync(this.#fd, lines, written, lines.length - written);
      if (this.#fsyncEachWrite) fs.fdatasyncSync(this.#fd);
      else this.#dirty = true;
    } catch (err) {
      this.#failed = (err as NodeJS.ErrnoException).code ?? 'write error';
      throw kmsError('AUDIT_WRITE_FAILED', `audit log write failed (${this.#failed}); operation refused`);
    }
  }

  #flushAsync(): void {
    if (!this.#dirty || this.#failed !== null) return;
    this.#dirty = false;
    fs.fdatasync(this.#fd, (err) => {
      if (err) this.#failed = err.code ?? 'fsync error';
    });
  }

  /** Flushes to disk and closes; safe to call twice. */
  close(): void {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
    if (this.#fd < 0) return;
    try {
      if (this.#failed === null) fs.fdatasyncSync(this.#fd);
    } finally {
      fs.closeSync(this.#fd);
      this.#fd = -1;
    }
  }
}
