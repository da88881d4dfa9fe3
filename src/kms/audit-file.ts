/**
 * The audit log file as the main thread sees it: proven writable at start-up, fsynced in groups,
 * closed on shutdown. The lines themselves are signed and appended by the workers (the audit key
 * lives there); fsync on this descriptor flushes their writes too, as they share the file.
 *
 * Failing closed: once any write has failed, `failed` stays set, the KMS reports unhealthy and
 * refuses further operations (AUDIT_WRITE_FAILED), so no key is used without its audit line.
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

  /** Notes that workers appended lines (fsynced at the next group interval). */
  markDirty(): void {
    if (this.#fsyncEachWrite) return;
    this.#dirty = true;
  }

  /** Records that a write failed somewhere; the KMS refuses operations from now on. */
  fail(reason: string): void {
    this.#failed ??= reason;
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
