/**
 * The audit log file as the main thread sees it: proven writable at start-up, fsynced in groups,
 * closed on shutdown. The lines themselves are signed and appended by the workers (the audit key
 * lives there); fsync on this descriptor flushes their writes too, as they share the file.
 *
 * Failing closed: once any write has failed, `failed` stays set, the KMS reports unhealthy and
 * refuses further operations (AUDIT_WRITE_FAILED), so no key is used without its audit line.
 */
import fs from 'node:fs';
import path from 'node:path';
import { kmsError } from '../errors.js';

export const AUDIT_FILE_NAME = 'kms-audit.log';

/**
 * A rolled file: `kms-audit.log.<number>`, numbered from 000001 up. The number, not the name,
 * orders the chain, so logrotate's `dateext` with `dateformat .%Y%m%d%H%M%S` names sort too.
 */
const ROLLED_NAME = /^kms-audit\.log\.([0-9]{1,20})$/;
const ROLLED_DIGITS = 6;

/** The rolled files of `dir` (names), oldest first. */
export function rolledAuditFiles(dir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return [];
  }
  return names
    .map((name) => ({ name, number: ROLLED_NAME.exec(name)?.[1] }))
    .filter((f): f is { name: string; number: string } => f.number !== undefined)
    .sort((a, b) => {
      const byNumber = BigInt(a.number) - BigInt(b.number);
      return byNumber < 0n ? -1 : byNumber > 0n ? 1 : a.name < b.name ? -1 : 1;
    })
    .map((f) => f.name);
}

/**
 * Every file of the audit chain of a data directory, in order: the rolled files, then the live
 * one. With `from` (a file name or path of one of them), only the files from it on.
 */
export function auditChainFiles(dataDir: string, from?: string): string[] {
  const names = [...rolledAuditFiles(dataDir), AUDIT_FILE_NAME];
  if (from === undefined) return names.map((name) => path.join(dataDir, name));
  const start = names.indexOf(path.basename(from));
  if (start < 0) {
    throw kmsError('INVALID_INPUT', `--from ${from}: no such audit log file in ${dataDir}`);
  }
  return names.slice(start).map((name) => path.join(dataDir, name));
}

/** The name the live file is rolled to: one past the highest number present. */
function nextRolledName(dir: string): string {
  const rolled = rolledAuditFiles(dir);
  const last = rolled[rolled.length - 1];
  const next = last === undefined ? 1n : BigInt(last.slice(AUDIT_FILE_NAME.length + 1)) + 1n;
  return `${AUDIT_FILE_NAME}.${next.toString().padStart(ROLLED_DIGITS, '0')}`;
}

/** Makes renames and new files in `dir` durable (best effort: not every file system allows it). */
function fsyncDir(dir: string): void {
  try {
    const fd = fs.openSync(dir, 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    // A directory that cannot be fsynced still holds the files; only the rename's durability waits.
  }
}

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

/** A file the workers were moved off (rollover, SIGHUP): fsynced with every flush until closed. */
interface RetiredFile {
  fd: number;
  /** Every task that could still append to it has finished: the next flush closes it. */
  quiet: boolean;
}

export interface AuditFileOptions {
  /** Group fsync interval; 0: every worker fsyncs its own writes. */
  fsyncMs: number;
  /** Roll the live file over once it holds this many bytes; null: never (logrotate or nothing). */
  maxBytes: number | null;
  /** Where rollover problems are reported (they fail nothing: the workers keep the file they have). */
  warn?: (message: string) => void;
}

/** After a failed rollover, the size is not checked again for this long. */
const ROLLOVER_RETRY_MS = 1000;

export class AuditFile {
  readonly path: string;
  /**
   * Bumped (Atomics) each time a new live file is opened: a worker that sees it change reopens
   * the path before its next block. Shared with every worker (WorkerInit.auditGeneration).
   */
  readonly generation = new SharedArrayBuffer(4);
  readonly #generation = new Int32Array(this.generation);
  #fd: number;
  readonly #retired: RetiredFile[] = [];
  #dirty = false;
  #flushing = false;
  #failed: string | null = null;
  #timer: NodeJS.Timeout | null = null;
  readonly #fsyncEachWrite: boolean;
  readonly #maxBytes: number | null;
  readonly #warn: (message: string) => void;
  #rolloverBlockedUntil = 0;
  /** Resolves once every task in flight when it was called has finished (CryptoPool.settled). */
  #tasksSettled: () => Promise<void> = () => Promise.resolve();

  #beforeFlush: FlushHook | null = null;

  private constructor(filePath: string, fd: number, opts: AuditFileOptions) {
    this.path = filePath;
    this.#fd = fd;
    this.#fsyncEachWrite = opts.fsyncMs === 0;
    this.#maxBytes = opts.maxBytes;
    this.#warn = opts.warn ?? (() => {});
    // With an fsync per write there is nothing to flush, but the flush hook still runs, seldom.
    this.#timer = setInterval(() => this.#flushAsync(), opts.fsyncMs > 0 ? opts.fsyncMs : FLUSH_HOOK_MS);
    this.#timer.unref();
  }

  /**
   * `beforeFlush` runs before each group flush, and the function it returns (if any) once that
   * flush is on disk: whatever it captured (the streams' heads) is then durable in the log.
   */
  onFlush(beforeFlush: FlushHook): void {
    this.#beforeFlush = beforeFlush;
  }

  /** How to wait for the tasks in flight: a file left by the workers is closed only after them. */
  waitForTasksWith(settled: () => Promise<void>): void {
    this.#tasksSettled = settled;
  }

  /** Opens (creating, 0600) the log for appending; AUDIT_UNWRITABLE if that is impossible. */
  static open(filePath: string, opts: AuditFileOptions): AuditFile {
    return new AuditFile(filePath, openForAppend(filePath), opts);
  }

  /**
   * Cuts a torn tail (see tornTailStart) so that new blocks follow the last complete one. Returns
   * the number of bytes dropped (0 if the log was intact). Called at start-up, once the master key
   * is known to match, before anything is appended. The newest rolled file is repaired too: a
   * crash just after a rollover can leave a worker's unfinished block there.
   */
  repairTornTail(): number {
    const dir = path.dirname(this.path);
    const newestRolled = rolledAuditFiles(dir).pop();
    let dropped = 0;
    if (newestRolled !== undefined) dropped += cutTornTail(path.join(dir, newestRolled), null);
    return dropped + cutTornTail(this.path, this.#fd);
  }

  get failed(): boolean {
    return this.#failed !== null;
  }

  /** Notes that workers appended lines (fsynced at the next group interval); rolls over when due. */
  markDirty(): void {
    this.#dirty = true;
    if (this.#maxBytes === null || this.#fd < 0 || this.#failed !== null) return;
    if (fs.fstatSync(this.#fd).size >= this.#maxBytes && Date.now() >= this.#rolloverBlockedUntil) {
      this.rollOver();
    }
  }

  /** Records that a write failed somewhere; the KMS refuses operations from now on. */
  fail(reason: string): void {
    this.#failed ??= reason;
  }

  /**
   * Renames the live file to the next `kms-audit.log.NNNNNN` and starts a new one. Returns the
   * rolled file's path, or null if the rename failed (the workers then keep the file they have).
   */
  rollOver(): string | null {
    const dir = path.dirname(this.path);
    const rolled = path.join(dir, nextRolledName(dir));
    try {
      fs.renameSync(this.path, rolled);
    } catch (err) {
      this.#rolloverFailed(`could not roll the audit log over to ${rolled}`, err);
      return null;
    }
    return this.reopen() ? rolled : null;
  }

  /**
   * Opens the live path anew and moves the workers to it: after a rollover, or on SIGHUP once
   * logrotate has renamed the file. Lines keep going to the old file until each worker has seen
   * the change; it is fsynced with every flush until the last task that could write to it has
   * finished, then closed. Returns false if the path cannot be opened (nothing changes then).
   */
  reopen(): boolean {
    if (this.#fd < 0) return false;
    let fd: number;
    try {
      fd = fs.openSync(this.path, 'a', 0o600);
    } catch (err) {
      this.#rolloverFailed(`could not open a new audit log ${this.path}`, err);
      return false;
    }
    const retired: RetiredFile = { fd: this.#fd, quiet: false };
    this.#retired.push(retired);
    this.#fd = fd;
    Atomics.add(this.#generation, 0, 1);
    fsyncDir(path.dirname(this.path));
    this.#tasksSettled().then(() => {
      retired.quiet = true;
      this.#dirty = true;
    });
    return true;
  }

  #rolloverFailed(what: string, err: unknown): void {
    this.#rolloverBlockedUntil = Date.now() + ROLLOVER_RETRY_MS;
    this.#warn(
      `${what} (${(err as NodeJS.ErrnoException).code ?? String(err)}); lines still go to the current file`,
    );
  }

  #flushAsync(): void {
    if (!this.#dirty || this.#failed !== null || this.#flushing) return;
    this.#dirty = false;
    const answer = this.#beforeFlush?.() ?? null;
    // Still dirty, so the hook is asked again at the next interval even if nothing else is written.
    if (answer === LATER) this.#dirty = true;
    const onDurable = answer === LATER ? null : answer;
    // Files no task can write to any more are closed once this flush has them on disk.
    const closing = this.#retired.filter((r) => r.quiet);
    const done = () => {
      for (const r of closing) {
        const at = this.#retired.indexOf(r);
        // close() came first and closed it (its number may already be another file's).
        if (at < 0) continue;
        this.#retired.splice(at, 1);
        fs.closeSync(r.fd);
      }
      onDurable?.();
    };
    // Each block was fsynced by its worker before its result came back.
    if (this.#fsyncEachWrite) {
      done();
      return;
    }
    this.#flushing = true;
    fdatasyncAll([this.#fd, ...this.#retired.map((r) => r.fd)], (err) => {
      this.#flushing = false;
      // After close() (which fsynced everything itself) its fds are gone: nothing to report.
      if (this.#fd < 0) return;
      if (err) this.#failed = err.code ?? 'fsync error';
      else done();
    });
  }

  /** Flushes to disk and closes; safe to call twice. */
  close(): void {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
    if (this.#fd < 0) return;
    const fds = [this.#fd, ...this.#retired.splice(0).map((r) => r.fd)];
    this.#fd = -1;
    try {
      if (this.#failed === null) for (const fd of fds) fs.fdatasyncSync(fd);
    } finally {
      for (const fd of fds) fs.closeSync(fd);
    }
  }
}

function openForAppend(filePath: string): number {
  try {
    return fs.openSync(filePath, 'a', 0o600);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'error';
    throw kmsError('AUDIT_UNWRITABLE', `audit log ${filePath} is not writable (${code})`);
  }
}

/** Cuts `filePath`'s torn tail (through `fd` if open, else opening it); returns the bytes dropped. */
function cutTornTail(filePath: string, fd: number | null): number {
  const keep = tornTailStart(filePath);
  if (keep === null) return 0;
  const own = fd ?? fs.openSync(filePath, 'r+');
  try {
    const size = fs.fstatSync(own).size;
    fs.ftruncateSync(own, keep);
    fs.fdatasyncSync(own);
    return size - keep;
  } finally {
    if (fd === null) fs.closeSync(own);
  }
}

/** fdatasync of every fd, in parallel; `done` gets the first error, if any. */
function fdatasyncAll(fds: readonly number[], done: (err: NodeJS.ErrnoException | null) => void): void {
  let pending = fds.length;
  let first: NodeJS.ErrnoException | null = null;
  for (const fd of fds) {
    fs.fdatasync(fd, (err) => {
      first ??= err;
      if (--pending === 0) done(first);
    });
  }
}
