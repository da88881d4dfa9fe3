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

/** The end of a signed line: every block ends with one. Inside JSON strings `"` and newlines are escaped. */
const SIGNED_LINE_END = /,"mac":"[0-9a-f]{64}"\}\n/g;
const TAIL_CHUNK_BYTES = 64 * 1024;
/** Length of what SIGNED_LINE_END matches. */
const SIGNED_LINE_END_BYTES = ',"mac":"'.length + 64 + 3;

/**
 * Where the log's last complete block ends. Workers append whole blocks with one write each, but a
 * process killed during a write can leave a prefix of its block (lines without their signed last
 * line, or half a line); no result of that block was released, since results wait for the write.
 * Returns null if the log ends with a signed line (or is empty), else the length to keep.
 * Reads backwards from the end in chunks: one small read for an intact log.
 */
export function tornTailStart(filePath: string): number | null {
  let fd: number;
  try {
    fd = fs.openSync(filePath, 'r');
  } catch {
    return null;
  }
  try {
    const size = fs.fstatSync(fd).size;
    if (size === 0) return null;
    const buffer = Buffer.allocUnsafe(TAIL_CHUNK_BYTES + SIGNED_LINE_END_BYTES);
    // Chunks from the end backwards, each overlapping the next one up by a signed line's end, so a
    // match across a chunk boundary is seen whole. Linear in the bytes read, even for a log with
    // no signed line at all.
    let end = size;
    while (end > 0) {
      const start = Math.max(0, end - TAIL_CHUNK_BYTES);
      const stop = Math.min(size, end + SIGNED_LINE_END_BYTES);
      const read = fs.readSync(fd, buffer, 0, stop - start, start);
      const text = buffer.toString('latin1', 0, read);
      let lastEnd = -1;
      for (const match of text.matchAll(SIGNED_LINE_END)) lastEnd = match.index + match[0].length;
      if (lastEnd >= 0) return start + lastEnd === size ? null : start + lastEnd;
      end = start;
    }
    return 0;
  } finally {
    fs.closeSync(fd);
  }
}

/** How often the flush hook runs when every write is fsynced by itself (auditFsyncMs = 0). */
const FLUSH_HOOK_MS = 1000;

/**
 * What a flush hook answers: a function to run once the flush is on disk, null for nothing to do,
 * or LATER to be asked again at the next interval (it has something, but not now).
 */
export const LATER = 'later';
export type FlushHook = () => (() => void) | null | typeof LATER;

export class AuditFile {
  readonly path: string;
  #fd: number;
  #dirty = false;
  #failed: string | null = null;
  #timer: NodeJS.Timeout | null = null;
  readonly #fsyncEachWrite: boolean;

  #beforeFlush: FlushHook | null = null;

  private constructor(filePath: string, fd: number, fsyncMs: number) {
    this.path = filePath;
    this.#fd = fd;
    this.#fsyncEachWrite = fsyncMs === 0;
    // With an fsync per write there is nothing to flush, but the flush hook still runs, seldom.
    this.#timer = setInterval(() => this.#flushAsync(), fsyncMs > 0 ? fsyncMs : FLUSH_HOOK_MS);
    this.#timer.unref();
  }

  /**
   * `beforeFlush` runs before each group flush, and the function it returns (if any) once that
   * flush is on disk: whatever it captured (the streams' heads) is then durable in the log.
   */
  onFlush(beforeFlush: FlushHook): void {
    this.#beforeFlush = beforeFlush;
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

  /**
   * Cuts a torn tail (see tornTailStart) so that new blocks follow the last complete one. Returns
   * the number of bytes dropped (0 if the log was intact). Called at start-up, once the master key
   * is known to match, before anything is appended.
   */
  repairTornTail(): number {
    const keep = tornTailStart(this.path);
    if (keep === null) return 0;
    const size = fs.fstatSync(this.#fd).size;
    fs.ftruncateSync(this.#fd, keep);
    fs.fdatasyncSync(this.#fd);
    return size - keep;
  }

  get failed(): boolean {
    return this.#failed !== null;
  }

  /** Notes that workers appended lines (fsynced at the next group interval). */
  markDirty(): void {
    this.#dirty = true;
  }

  /** Records that a write failed somewhere; the KMS refuses operations from now on. */
  fail(reason: string): void {
    this.#failed ??= reason;
  }

  #flushAsync(): void {
    if (!this.#dirty || this.#failed !== null) return;
    this.#dirty = false;
    const answer = this.#beforeFlush?.() ?? null;
    // Still dirty, so the hook is asked again at the next interval even if nothing else is written.
    if (answer === LATER) this.#dirty = true;
    const onDurable = answer === LATER ? null : answer;
    // Each block was fsynced by its worker before its result came back.
    if (this.#fsyncEachWrite) {
      onDurable?.();
      return;
    }
    fs.fdatasync(this.#fd, (err) => {
      if (err) this.#failed = err.code ?? 'fsync error';
      else onDurable?.();
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
