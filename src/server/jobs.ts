/**
 * Resumable admin jobs: thread DEK rotation, encrypt-threads, and finishing thread deletions.
 *
 * Each job keeps its progress in the store and saves it in the same transaction as each batch of
 * rewritten messages, so after a crash (even kill -9) it resumes after the last committed batch.
 * Write-backs are compare-and-set on the message's `rev`, so concurrent API writes are never
 * overwritten; reads keep working throughout because every ciphertext names its DEK version.
 */
import { setTimeout as delay } from 'node:timers/promises';
import type { CallContext, ItemResult } from '../api/index.js';
import { type CodedError, toCodedError, UserError } from '../errors.js';
import type { Logger } from '../log.js';
import type { ServerMetrics } from './metrics.js';
import type { ChatService } from './service.js';
import type { MessageContent, MessageRecord } from './store.js';

type JobState = 'running' | 'completed' | 'failed';

export interface RotationJob {
  threadId: string;
  keyId: string;
  state: JobState;
  /** 'rotate' until the new DEK version exists, then 'reencrypt', then 'destroy'. */
  phase: 'rotate' | 'reencrypt' | 'destroy' | 'done';
  targetVersion: number | null;
  /** Last message id handled (messages are scanned oldest first). */
  cursor: string | null;
  /** Messages in the thread when the job started (absent in jobs stored by earlier versions). */
  total?: number;
  scanned: number;
  reencrypted: number;
  /** Messages that could not be decrypted (tampered); they are reported, not re-encrypted. */
  undecryptable: string[];
  destroyedVersions: number[];
  startedAt: string;
  finishedAt: string | null;
  lastError: string | null;
}

export interface EncryptThreadsJob {
  state: JobState;
  /** Last thread fully handled (threads are scanned oldest first). */
  threadCursor: string | null;
  /** Thread in progress and the last message id handled in it. */
  current: { threadId: string; cursor: string | null } | null;
  /** Threads stored when the job started (absent in jobs stored by earlier versions). */
  total?: number;
  threads: number;
  encrypted: number;
  undecryptable: string[];
  startedAt: string;
  finishedAt: string | null;
  lastError: string | null;
}

const ROTATE_PREFIX = 'rotate:';
const ENCRYPT_KEY = 'encrypt-threads';
const DELETE_PREFIX = 'delete:';
const MAX_REPORTED = 100;
const RETRY_MAX_MS = 5_000;

export function rotationView(job: RotationJob) {
  return {
    thread_id: job.threadId,
    state: job.state,
    phase: job.phase,
    target_key_version: job.targetVersion,
    total: job.total ?? null,
    scanned: job.scanned,
    reencrypted: job.reencrypted,
    undecryptable: job.undecryptable,
    destroyed_versions: job.destroyedVersions,
    started_at: job.startedAt,
    finished_at: job.finishedAt,
    last_error: job.lastError,
  };
}

export function encryptThreadsView(job: EncryptThreadsJob) {
  return {
    state: job.state,
    total: job.total ?? null,
    threads: job.threads,
    encrypted: job.encrypted,
    undecryptable: job.undecryptable,
    current_thread: job.current?.threadId ?? null,
    started_at: job.startedAt,
    finished_at: job.finishedAt,
    last_error: job.lastError,
  };
}

/** Runs a job without waiting for it; its failures are already logged and recorded on the job. */
export function background(job: Promise<void>): void {
  job.catch(() => undefined);
}

export class JobRunner {
  /** Jobs running in this process: the live job object (mutated as it progresses) and its end. */
  private readonly running = new Map<string, { job: object | null; done: Promise<void> }>();
  private stopping = false;
  private readonly ctx: CallContext = { caller: 'progressdb-server' };

  constructor(
    private readonly service: ChatService,
    private readonly metrics: ServerMetrics,
    private readonly logger: Logger,
    private readonly batchSize: number,
    private readonly pauseMs: number,
  ) {}

  private get store() {
    return this.service.store;
  }

  /** Resumes every unfinished job found in the store (called once at start-up). */
  resumeAll(): void {
    for (const { value } of this.store.jobsWithPrefix<{ threadId: string; keyId: string | null }>(
      DELETE_PREFIX,
    )) {
      background(
        this.launch(`${DELETE_PREFIX}${value.threadId}`, 'delete', null, () =>
          this.service.finishDelete(value.threadId, value.keyId, this.ctx),
        ),
      );
    }
    for (const { value } of this.store.jobsWithPrefix<RotationJob>(ROTATE_PREFIX)) {
      if (value.state === 'running') background(this.startRotation(value.threadId).done);
    }
    const enc = this.store.getJob<EncryptThreadsJob>(ENCRYPT_KEY);
    if (enc?.state === 'running') background(this.startEncryptThreads().done);
  }

  /** Lets running jobs finish their current batch, then stops them. */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.allSettled(Array.from(this.running.values(), (r) => r.done));
  }

  runningCount(): number {
    return this.running.size;
  }

  // ------------------------------------------------------------------------------------------
  // thread DEK rotation

  rotation(threadId: string): RotationJob | undefined {
    const key = `${ROTATE_PREFIX}${threadId}`;
    return (this.running.get(key)?.job as RotationJob | undefined) ?? this.store.getJob<RotationJob>(key);
  }

  /** Starts (or joins, or resumes) the DEK rotation of one thread; `done` resolves when it has finished. */
  startRotation(threadId: string): { job: RotationJob; done: Promise<void> } {
    const key = `${ROTATE_PREFIX}${threadId}`;
    const existing = this.running.get(key);
    if (existing) return existing as { job: RotationJob; done: Promise<void> };
    let job = this.store.getJob<RotationJob>(key);
    if (job?.state !== 'running') {
      const t = this.service.thread(threadId);
      if (t.keyId === null) {
        throw new UserError('CONFLICT', 'the thread is not encrypted: run encrypt-threads first');
      }
      job = {
        threadId,
        keyId: t.keyId,
        state: 'running',
        phase: 'rotate',
        targetVersion: null,
        cursor: null,
        total: this.store.messageCount(threadId),
        scanned: 0,
        reencrypted: 0,
        undecryptable: [],
        destroyedVersions: [],
        startedAt: new Date().toISOString(),
        finishedAt: null,
        lastError: null,
      };
    }
    const started = job;
    return { job, done: this.launch(key, 'rotate-thread-dek', started, () => this.rotate(key, started)) };
  }

  private async rotate(key: string, job: RotationJob): Promise<void> {
    await this.store.putJob(key, job);
    const kms = this.service.requireKms();
    if (job.phase === 'rotate') {
      // Re-running this after a crash only adds one more version; the scan below handles any.
      const dek = await kms.rotateDek(job.keyId, this.ctx);
      if (!(await this.store.raiseMinKeyVersion(job.threadId, dek.keyVersion))) {
        return this.finish(key, job, 'failed', 'the thread was deleted');
      }
      job.targetVersion = dek.keyVersion;
      job.phase = 'reencrypt';
      await this.store.putJob(key, job);
    }
    // biome-ignore lint/style/noNonNullAssertion: set just above for the reencrypt phase
    const target = job.targetVersion!;
    while (job.phase === 'reencrypt') {
      if (this.stopping) return;
      const batch = this.store.scanMessages(job.threadId, job.cursor, this.batchSize);
      if (batch.length === 0) {
        job.phase = 'destroy';
        await this.store.putJob(key, job);
        break;
      }
      const old = batch.filter((r) => r.ct !== undefined && (r.kv ?? 0) < target);
      const reencrypted =
        old.length > 0 ? await this.service.codec.reencryptBatch(job.keyId, job.threadId, old, this.ctx) : [];
      const updates = this.collect(old, reencrypted, job.undecryptable);
      // biome-ignore lint/style/noNonNullAssertion: the batch is not empty (checked above)
      const next = { ...job, cursor: batch[batch.length - 1]!.id, scanned: job.scanned + batch.length };
      const written = await this.store.replaceContents(job.threadId, updates, {
        key,
        value: (n) => Object.assign(next, { reencrypted: job.reencrypted + n }),
      });
      if (written === 'thread-gone') return this.finish(key, job, 'failed', 'the thread was deleted');
      if (written === 'stale') continue;
      Object.assign(job, next);
      this.metrics.jobItems.inc({ job: 'rotate-thread-dek' }, written);
      if (this.pauseMs > 0) await delay(this.pauseMs);
    }
    if (job.phase === 'destroy') {
      // Every message now names `target` or newer: the older versions can go (idempotent on resume).
      const result = await kms.destroyDekVersionsBefore(job.keyId, target, this.ctx);
      job.destroyedVersions = [...new Set([...job.destroyedVersions, ...result.destroyedVersions])];
      job.phase = 'done';
      await this.finish(key, job, 'completed', null);
      this.logger.info(
        { threadId: job.threadId, keyVersion: target, destroyedVersions: job.destroyedVersions },
        'thread DEK rotated; older versions destroyed',
      );
    }
  }

  // ------------------------------------------------------------------------------------------
  // encrypt-threads

  encryptThreadsStatus(): EncryptThreadsJob | undefined {
    return (
      (this.running.get(ENCRYPT_KEY)?.job as EncryptThreadsJob | undefined) ??
      this.store.getJob<EncryptThreadsJob>(ENCRYPT_KEY)
    );
  }

  startEncryptThreads(): { job: EncryptThreadsJob; done: Promise<void> } {
    const existing = this.running.get(ENCRYPT_KEY);
    if (existing) return existing as { job: EncryptThreadsJob; done: Promise<void> };
    this.service.requireKms();
    let job = this.store.getJob<EncryptThreadsJob>(ENCRYPT_KEY);
    if (job?.state !== 'running') {
      job = {
        state: 'running',
        threadCursor: null,
        current: null,
        total: this.store.counts().threads,
        threads: 0,
        encrypted: 0,
        undecryptable: [],
        startedAt: new Date().toISOString(),
        finishedAt: null,
        lastError: null,
      };
    }
    const started = job;
    return {
      job,
      done: this.launch(ENCRYPT_KEY, 'encrypt-threads', started, () => this.encryptThreads(started)),
    };
  }

  private async encryptThreads(job: EncryptThreadsJob): Promise<void> {
    await this.store.putJob(ENCRYPT_KEY, job);
    for (;;) {
      if (this.stopping) return;
      if (job.current === null) {
        const [next] = this.store.threadIdsAfter(job.threadCursor, 1);
        if (next === undefined) return this.finish(ENCRYPT_KEY, job, 'completed', null);
        job.current = { threadId: next, cursor: null };
      }
      const { threadId } = job.current;
      const done = await this.encryptThreadBatch(job, threadId);
      if (done) {
        job.threadCursor = threadId;
        job.current = null;
        job.threads++;
        await this.store.putJob(ENCRYPT_KEY, job);
      }
      if (this.pauseMs > 0) await delay(this.pauseMs);
    }
  }

  /** Encrypts one batch of the thread's plaintext messages; true when the thread is finished. */
  private async encryptThreadBatch(job: EncryptThreadsJob, threadId: string): Promise<boolean> {
    let t = this.store.liveThread(threadId);
    if (!t) return true;
    // The DEK is recorded on the thread before the scan: from then on, API writes to the thread are
    // encrypted (a plaintext write racing with this is refused by the store and redone).
    t = await this.service.ensureThreadKey(t, this.ctx);
    // biome-ignore lint/style/noNonNullAssertion: a running encrypt job always has a current thread
    const batch = this.store.scanMessages(threadId, job.current!.cursor, this.batchSize);
    if (batch.length === 0) return true;
    const plain = batch.filter((r) => r.plain !== undefined);
    const sealed =
      // biome-ignore lint/style/noNonNullAssertion: ensureThreadKey returns the thread with its key
      plain.length > 0 ? await this.service.codec.sealBatch(t.keyId!, threadId, plain, this.ctx) : [];
    const updates = this.collect(plain, sealed, job.undecryptable);
    // biome-ignore lint/style/noNonNullAssertion: the batch is not empty (checked above)
    const next = { ...job, current: { threadId, cursor: batch[batch.length - 1]!.id } };
    const written = await this.store.replaceContents(threadId, updates, {
      key: ENCRYPT_KEY,
      value: (n) => Object.assign(next, { encrypted: job.encrypted + n }),
    });
    if (written === 'thread-gone') return true;
    if (written === 'stale') return false;
    Object.assign(job, next);
    this.metrics.jobItems.inc({ job: 'encrypt-threads' }, written);
    return false;
  }

  // ------------------------------------------------------------------------------------------

  /**
   * Successful items become updates; an item that failed for its own reason (e.g. a tampered
   * ciphertext) is reported and skipped; a service failure (KMS down) fails the whole batch, so it
   * is retried rather than skipped.
   */
  private collect(
    records: readonly MessageRecord[],
    results: readonly ItemResult<MessageContent>[],
    report: string[],
  ): { id: string; rev: number; content: MessageContent }[] {
    const updates: { id: string; rev: number; content: MessageContent }[] = [];
    results.forEach((s, i) => {
      // biome-ignore lint/style/noNonNullAssertion: i < records.length
      const r = records[i]!;
      if (s.ok) {
        updates.push({ id: r.id, rev: r.rev, content: s.value });
        return;
      }
      const err = s.error;
      if (err.status >= 500) throw err;
      if (report.length < MAX_REPORTED && !report.includes(r.id)) report.push(r.id);
      this.logger.warn({ messageId: r.id, code: err.code }, 'message could not be decrypted; left as it is');
    });
    return updates;
  }

  private async finish(
    key: string,
    job: RotationJob | EncryptThreadsJob,
    state: JobState,
    error: string | null,
  ) {
    job.state = state;
    job.finishedAt = new Date().toISOString();
    job.lastError = error;
    await this.store.putJob(key, job);
  }

  /**
   * Runs a job once at a time per key, retrying service failures (KMS unavailable) with backoff
   * until it succeeds or the server stops. Caller errors end the job.
   */
  private launch(key: string, kind: string, job: object | null, body: () => Promise<void>): Promise<void> {
    const run = async () => {
      this.metrics.jobsRunning.inc({ job: kind });
      let backoff = 100;
      try {
        for (;;) {
          try {
            await body();
            return;
          } catch (thrown) {
            const err: CodedError = toCodedError(thrown);
            this.logger.warn({ job: kind, key, code: err.code }, `job interrupted: ${err.message}`);
            await this.noteError(key, job, err, err.status < 500);
            if (err.status < 500) throw err;
            if (this.stopping) return;
            await delay(backoff);
            backoff = Math.min(backoff * 2, RETRY_MAX_MS);
          }
        }
      } finally {
        this.metrics.jobsRunning.dec({ job: kind });
        this.running.delete(key);
      }
    };
    const promise = run();
    // The map holds a promise that never rejects: joiners and stop() must not see unhandled errors.
    this.running.set(key, { job, done: promise.catch(() => undefined) });
    return promise;
  }

  /** Records the error on the job; a caller error (4xx) ends it as failed. */
  private async noteError(key: string, job: object | null, err: CodedError, fatal: boolean): Promise<void> {
    if (job === null) return;
    const fields: Partial<RotationJob> = { lastError: `${err.code}: ${err.message}` };
    if (fatal) Object.assign(fields, { state: 'failed', finishedAt: new Date().toISOString() });
    Object.assign(job, fields);
    await this.store.putJob(key, job);
  }
}
