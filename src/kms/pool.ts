/**
 * The crypto worker pool and its micro-batcher.
 *
 * A Piscina task costs ~40 µs of round trip, several times a 1 KiB AES-GCM operation, so
 * concurrent operations are coalesced: each op is queued, and queued ops leave as one task with
 * all their bytes packed into one transferred ArrayBuffer. When the pool is idle an op leaves at
 * the end of the current microtask turn (lowest latency for a lone caller); while tasks are in
 * flight ops wait for the next event-loop turn, so batches fill up under load.
 */
import { availableParallelism } from 'node:os';
import { BroadcastChannel } from 'node:worker_threads';
import { Piscina } from 'piscina';
import type { KeyMemoryStatus } from '../api/index.js';
import type { StreamCheckpoint } from '../audit-checkpoint.js';
import type { StreamHead } from '../audit-link.js';
import { type CodedError, type ErrorCode, kmsError, toCodedError } from '../errors.js';
import {
  type AuditCheckpointResult,
  type AuditFields,
  type BatchResult,
  BatchResultReader,
  BatchTaskWriter,
  type DekRef,
  IDLE_SPIN_SIGNAL_BYTES,
  IDLE_SPIN_WORKER_SLOTS,
  IdleSpinSlot,
  type KekRef,
  type KeyMemoryReport,
  OpKind,
  type OpKindValue,
  type TaskOutcome,
  type WorkerError,
  type WorkerInit,
  type WorkerTask,
  type ZeroizeResult,
  type ZeroizeTask,
} from '../worker-abi/index.js';
import { buildBatchTask } from './batch-builder.js';
import { DekDirectory } from './dek-directory.js';

/** Settles one op: `error` null on success, with the output bytes and the DEK version used. */
export type OpCallback = (error: ErrorCode | null, output: Buffer | null, keyVersion: number) => void;

export interface PendingOp {
  kind: OpKindValue;
  /** For reencrypt: [current, source]. For generate: a template (wrapped is empty). */
  deks: readonly DekRef[];
  input: Uint8Array | null;
  aad: Uint8Array | null;
  audit: AuditFields | null;
  preError: ErrorCode | null;
  done: OpCallback;
}

export interface PoolOptions {
  threads: number;
  maxBatch: number;
  /** How long a worker spins for its next task before parking (0: never). See workers/idle-spin.ts. */
  idleSpinUs: number;
  init: Omit<WorkerInit, 'idleSpin'>;
  /** KEK records the batch needs, by version (main-thread cache of wrapped KEKs). */
  kekRef: (version: number) => KekRef | undefined;
  /**
   * Called after each task that appended audit lines (with its worker's stream head), or whose
   * audit write failed.
   */
  onAudit: (failed: boolean, head: StreamHead | undefined, checkpoint?: StreamCheckpoint) => void;
  activeKekVersion: () => number;
  /** Called with each worker's key-memory report as it starts. */
  onKeyMemory?: (report: KeyMemoryReport) => void;
}

/**
 * Tasks in flight per worker: one running and two waiting. With two, under 256 callers both
 * sides idled ~40% of the time at each hand-off (a thread wake-up costs tens of µs here); with
 * three, bench:keys measured 10,000-key decrypt ~130k -> ~157k ops/s and one key ~265k -> ~290k
 * (alternating runs); four was no better than three.
 */
const TASKS_PER_WORKER = 3;

/** Smallest share of a burst worth a task of its own when splitting it across idle workers. */
const MIN_SPLIT_OPS = 8;

/** Bytes packed into one task before it leaves even if it has fewer than maxBatch ops. */
const MAX_TASK_BYTES = 1 << 20;

function opBytes(op: PendingOp): number {
  return BatchTaskWriter.bytesFor(op.kind, op.input?.length ?? 0, op.aad?.length ?? 0);
}

type LoadBalancer = NonNullable<NonNullable<ConstructorParameters<typeof Piscina>[0]>['loadBalancer']>;

/**
 * Piscina's least-busy choice, except that an idle worker that is spinning for work gets it (no
 * wake-up to pay), and every post is counted in the worker's slot of the idle-spin signal: that
 * count is what a spinning worker watches.
 */
function spinAwareBalancer(signal: Int32Array, maximumUsage: number): LoadBalancer {
  return (_task, workers) => {
    const spinner = Atomics.load(signal, IdleSpinSlot.spinner);
    let idle: (typeof workers)[number] | null = null;
    let leastBusy: (typeof workers)[number] | null = null;
    let lowest = maximumUsage;
    for (const worker of workers) {
      if (worker.currentUsage === 0) {
        if (worker.id === spinner) {
          idle = worker;
          break;
        }
        idle ??= worker;
      } else if (worker.currentUsage < lowest) {
        leastBusy = worker;
        lowest = worker.currentUsage;
      }
    }
    const candidate = idle ?? leastBusy;
    if (candidate !== null) {
      const slot = IdleSpinSlot.posted + (candidate.id % IDLE_SPIN_WORKER_SLOTS);
      // Counted after Piscina has posted the task (it does so synchronously once we return), so a
      // spinner that sees the count finds the message already there.
      queueMicrotask(() => Atomics.add(signal, slot, 1));
    }
    return candidate;
  };
}

/** URL of a file in workers/. Under tsx (tests) this module is .ts and so are they; built, .js. */
export function workerFile(name: 'crypto' | 'keygen'): string {
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  return new URL(`../../workers/${name}${ext}`, import.meta.url).href;
}

/**
 * The Node flags a crypto worker starts with: the process's own, less a TypeScript loader (tsx)
 * when the workers are built JavaScript. A harness that runs the built package under tsx (bench/)
 * would otherwise load every worker module through it (its export getters measured ~8% of a
 * worker's time), which no deployment does.
 */
export function workerExecArgv(execArgv: readonly string[], file: string): string[] {
  if (!file.endsWith('.js')) return [...execArgv];
  const kept: string[] = [];
  for (let i = 0; i < execArgv.length; i++) {
    const arg = execArgv[i] as string;
    if (arg === '--import=tsx' || arg === '--import=tsx/esm') continue;
    if (arg === '--import' && (execArgv[i + 1] === 'tsx' || execArgv[i + 1] === 'tsx/esm')) {
      i++;
      continue;
    }
    kept.push(arg);
  }
  return kept;
}

/** A failure a worker reported as data, as the CodedError it stands for (same code and message). */
export function fromWorkerError(error: WorkerError): CodedError {
  return kmsError(error.code, error.message);
}

/**
 * Runs a task and unwraps its outcome. A failure the worker reported becomes its CodedError; a
 * rejection (the worker crashed, or threw something unexpected) becomes INTERNAL, cause kept.
 */
export async function runTask<T>(
  piscina: Piscina,
  task: WorkerTask,
  transferList?: ArrayBuffer[],
): Promise<T> {
  let outcome: TaskOutcome<T>;
  try {
    outcome = (await piscina.run(task, transferList === undefined ? {} : { transferList })) as TaskOutcome<T>;
  } catch (err) {
    throw toCodedError(err);
  }
  if (!outcome.ok) throw fromWorkerError(outcome.error);
  return outcome.value;
}

export class CryptoPool {
  readonly #piscina: Piscina;
  readonly #opts: PoolOptions;
  readonly #channel: BroadcastChannel;
  readonly #maxInFlight: number;
  #queue: PendingOp[] = [];
  #inFlight = 0;
  #scheduled = false;
  #idleWaiters: (() => void)[] = [];
  readonly #keyMemory = new Map<number, KeyMemoryReport>();
  #reportWaiters: (() => void)[] = [];
  /** Names ops' keys by entry (dek-directory.ts); null when the workers were given none. */
  readonly #directory: DekDirectory | null;
  /** Batch tasks are numbered as built; those not yet settled may name directory entries. */
  #tasksBuilt = 0;
  readonly #taskNumbersInFlight = new Set<number>();
  /** Every task posted to a worker and not yet settled (see settled()). */
  readonly #running = new Set<Promise<unknown>>();

  constructor(opts: PoolOptions) {
    this.#opts = opts;
    this.#directory = opts.init.keyDirectory === null ? null : new DekDirectory(opts.init.keyDirectory);
    // Open before the workers start, so that no worker's start-up report goes unheard.
    this.#channel = new BroadcastChannel(opts.init.evictChannel);
    this.#channel.onmessage = (event) => {
      const message = (event as MessageEvent).data as { type?: string };
      if (message?.type !== 'key-memory') return;
      const report = message as KeyMemoryReport;
      this.#keyMemory.set(report.threadId, report);
      opts.onKeyMemory?.(report);
      if (this.#keyMemory.size >= opts.threads) for (const wake of this.#reportWaiters.splice(0)) wake();
    };
    this.#channel.unref();
    const signal = new SharedArrayBuffer(IDLE_SPIN_SIGNAL_BYTES);
    const idleSpin =
      opts.idleSpinUs > 0 ? { signal, budgetUs: opts.idleSpinUs, cores: availableParallelism() } : null;
    const filename = workerFile('crypto');
    this.#piscina = new Piscina({
      filename,
      execArgv: workerExecArgv(process.execArgv, filename),
      minThreads: opts.threads,
      maxThreads: opts.threads,
      idleTimeout: Number.POSITIVE_INFINITY,
      // A worker holds its next tasks while it runs one, so it never idles waiting for the main
      // thread to hand it more work.
      concurrentTasksPerWorker: TASKS_PER_WORKER,
      loadBalancer: spinAwareBalancer(new Int32Array(signal), TASKS_PER_WORKER),
      workerData: { ...opts.init, idleSpin } satisfies WorkerInit,
      // Without it, deep queues starve some tasks for hundreds of ms.
      stricterFIFO: true,
      // 'sync' (the default) parks idle workers in a blocking Atomics.wait, so they never run
      // their BroadcastChannel handler: evicted keys stayed cached and close() never got the
      // zeroize acknowledgement (keys not zeroed, close stalled for the 2 s timeout).
      atomics: 'async',
    });
    this.#maxInFlight = opts.threads * TASKS_PER_WORKER;
  }

  /**
   * Resolves once every worker has reported its key memory (so start-up warns before it serves),
   * or after `timeoutMs` if some never does: a missing report is no reason not to start.
   */
  workersReported(timeoutMs: number): Promise<void> {
    if (this.#keyMemory.size >= this.#opts.threads) return Promise.resolve();
    return new Promise((resolve) => {
      // Ref'd on purpose: start-up awaits this while idle workers, their channel and the loop
      // hold nothing else, and an unref'd timer let Node exit mid-start (code 13, "unsettled
      // top-level await") when a worker was slow to load; seen under CI load.
      const timer = setTimeout(resolve, timeoutMs);
      this.#reportWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** Key memory summed over the workers that reported, or undefined before any did. */
  keyMemory(): KeyMemoryStatus | undefined {
    if (this.#keyMemory.size === 0) return undefined;
    let lockedBytes = 0;
    let unlockedBytes = 0;
    for (const report of this.#keyMemory.values()) {
      lockedBytes += report.lockedBytes;
      unlockedBytes += report.unlockedBytes;
    }
    return { lockedBytes, unlockedBytes };
  }

  get threads(): number {
    return this.#piscina.threads.length;
  }

  /** Ops waiting for a task plus tasks waiting for a worker. */
  get queueDepth(): number {
    return this.#queue.length + this.#piscina.queueSize;
  }

  /** Runs a non-batch task (KEK creation, start-up check, audit verification). */
  run<T>(task: WorkerTask): Promise<T> {
    return this.#track(runTask<T>(this.#piscina, task));
  }

  #track<T>(task: Promise<T>): Promise<T> {
    this.#running.add(task);
    const forget = () => this.#running.delete(task);
    task.then(forget, forget);
    return task;
  }

  /**
   * Resolves once every task posted to a worker before this call has finished, however it ended.
   * An audit file the workers were moved off is closed after this: no task can write to it then.
   */
  settled(): Promise<void> {
    return Promise.allSettled([...this.#running]).then(() => undefined);
  }

  enqueue(op: PendingOp): void {
    this.#queue.push(op);
    if (this.#queue.length >= this.#opts.maxBatch && this.#inFlight < this.#maxInFlight) {
      this.#drain();
    } else if (!this.#scheduled) {
      this.#scheduled = true;
      if (this.#inFlight === 0) queueMicrotask(this.#onSchedule);
      else setImmediate(this.#onSchedule);
    }
  }

  readonly #onSchedule = (): void => {
    this.#scheduled = false;
    this.#drain();
  };

  #drain(): void {
    while (this.#queue.length > 0 && this.#inFlight < this.#maxInFlight) {
      // A burst that meets idle workers (one page of decrypts, say) is split between them, so they
      // share it instead of one worker doing it all while the others wait.
      const idleWorkers = this.#opts.threads - this.#inFlight;
      const share =
        idleWorkers > 1 && this.#queue.length >= 2 * MIN_SPLIT_OPS
          ? Math.max(MIN_SPLIT_OPS, Math.ceil(this.#queue.length / idleWorkers))
          : this.#opts.maxBatch;
      const maxBatch = Math.min(this.#opts.maxBatch, share);
      let count = 0;
      let bytes = 0;
      while (count < this.#queue.length && count < maxBatch && (count === 0 || bytes < MAX_TASK_BYTES)) {
        // biome-ignore lint/style/noNonNullAssertion: hot path: indexes within the batch and each op's deks (count < length; reencrypt has two)
        const op = this.#queue[count]!;
        bytes += opBytes(op);
        count++;
      }
      const batch = count === this.#queue.length ? this.#queue : this.#queue.slice(0, count);
      this.#queue = count === this.#queue.length ? [] : this.#queue.slice(count);
      this.#dispatch(batch, bytes);
    }
  }

  /**
   * Runs one task of `kind` (rewrap) over every DEK in `deks`, plus an audit note when `audit` is
   * given, and returns the raw result: bulk work such as KEK rotation, with no callback per key.
   * Result slot i belongs to deks[i].
   */
  async runBulk(kind: OpKindValue, deks: DekRef[], audit: AuditFields | null): Promise<BatchResultReader> {
    const kekVersions = new Set<number>([this.#opts.activeKekVersion()]);
    const slot = BatchTaskWriter.bytesFor(kind, 0, 0);
    const writer = new BatchTaskWriter(deks.length + (audit === null ? 0 : 1), deks.length * slot);
    for (let i = 0; i < deks.length; i++) {
      writer.add(kind, i, null, null, -1, -1);
      // biome-ignore lint/style/noNonNullAssertion: hot path: indexes within the batch and each op's deks (count < length; reencrypt has two)
      kekVersions.add(deks[i]!.kekVersion);
    }
    if (audit !== null) writer.add(OpKind.note, -1, null, null, 0, -1);
    const task = writer.finish({
      keks: this.#kekRefs(kekVersions),
      deks,
      targetKekVersion: this.#opts.activeKekVersion(),
      audit: audit === null ? [] : [audit],
      callers: [],
      errors: [],
    });
    this.#inFlight++;
    try {
      const result = new BatchResultReader(
        await this.#track(runTask<BatchResult>(this.#piscina, task, BatchTaskWriter.transferList(task))),
      );
      this.#reportAudit(result);
      return result;
    } finally {
      this.#taskDone();
    }
  }

  #reportAudit(result: BatchResultReader): void {
    const { audited, auditHead, auditCheckpoint } = result.result;
    if (audited || result.auditFailed) this.#opts.onAudit(!audited, auditHead, auditCheckpoint);
  }

  #kekRefs(versions: Iterable<number>): KekRef[] {
    const keks: KekRef[] = [];
    for (const version of versions) {
      const kek = this.#opts.kekRef(version);
      if (kek !== undefined) keks.push(kek);
    }
    return keks;
  }

  #dispatch(batch: PendingOp[], bytes: number): void {
    const taskNumber = this.#tasksBuilt++;
    let oldestInFlight = taskNumber;
    for (const n of this.#taskNumbersInFlight) if (n < oldestInFlight) oldestInFlight = n;
    const task = buildBatchTask(batch, bytes, {
      target: this.#opts.activeKekVersion(),
      kekRefs: (versions) => this.#kekRefs(versions),
      directory: this.#directory,
      taskNumber,
      oldestInFlight,
    });
    this.#taskNumbersInFlight.add(taskNumber);
    const release = () => this.#taskNumbersInFlight.delete(taskNumber);
    this.#inFlight++;
    // The bytes move, never copied: measured cheaper at every size from one op up.
    this.#track(this.#piscina.run(task, { transferList: BatchTaskWriter.transferList(task) })).then(
      (outcome: TaskOutcome<BatchResult>) => {
        release();
        if (outcome.ok) this.#settle(batch, new BatchResultReader(outcome.value));
        else this.#fail(batch, outcome.error.code);
      },
      (err: unknown) => {
        release();
        this.#fail(batch, toCodedError(err).code);
      },
    );
  }

  #settle(batch: PendingOp[], result: BatchResultReader): void {
    this.#taskDone();
    this.#reportAudit(result);
    for (let i = 0; i < batch.length; i++) {
      const error = result.error(i);
      // biome-ignore lint/style/noNonNullAssertion: hot path: indexes within the batch and each op's deks (count < length; reencrypt has two)
      if (error !== null) batch[i]!.done(error.code, null, 0);
      // biome-ignore lint/style/noNonNullAssertion: hot path: indexes within the batch and each op's deks (count < length; reencrypt has two)
      else batch[i]!.done(null, result.output(i), result.keyVersion(i));
    }
  }

  /** The whole task failed: every op settles with its code (the main thread words the message). */
  #fail(batch: PendingOp[], code: ErrorCode): void {
    this.#taskDone();
    for (const op of batch) op.done(code, null, 0);
  }

  #taskDone(): void {
    this.#inFlight--;
    if (this.#queue.length > 0 && !this.#scheduled) {
      this.#scheduled = true;
      setImmediate(this.#onSchedule);
    }
    if (this.#inFlight === 0 && this.#queue.length === 0) {
      for (const resolve of this.#idleWaiters.splice(0)) resolve();
    }
  }

  /** Resolves once every queued and in-flight op has settled. */
  idle(): Promise<void> {
    if (this.#inFlight === 0 && this.#queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Tells every worker to drop (and zero) a destroyed key's cached versions. */
  evict(keyId: string): void {
    this.#channel.postMessage({ type: 'evict', keyId });
  }

  /**
   * Asks every worker to checkpoint its audit stream (one task each, handed out as close() hands
   * out zeroize: N tasks posted together go to N idle workers). Best effort: a worker that got
   * none writes its checkpoint at its next due block or round.
   */
  async checkpointAll(): Promise<void> {
    const task = { type: 'audit-checkpoint' } as const;
    const results = await Promise.allSettled(
      Array.from({ length: this.#piscina.threads.length }, () =>
        this.#track(runTask<AuditCheckpointResult>(this.#piscina, task)),
      ),
    );
    for (const r of results) {
      if (r.status === 'rejected') this.#opts.onAudit(true, undefined);
      else if (r.value.audited) this.#opts.onAudit(false, r.value.auditHead, r.value.auditCheckpoint);
    }
  }

  /**
   * Zeroes every key in every worker, then stops the threads. Returns how many workers confirmed.
   * One zeroize task per worker: the balancer hands each of N tasks posted together to a different
   * idle worker, and a task also reaches a worker still loading its code (a broadcast would be lost
   * there, and close() used to wait in vain for its acknowledgement).
   */
  async close(): Promise<{ workers: number; zeroed: number }> {
    await this.idle();
    const workers = this.#piscina.threads.length;
    const task: ZeroizeTask = { type: 'zeroize' };
    const results = await Promise.allSettled(
      Array.from({ length: workers }, () => runTask<ZeroizeResult>(this.#piscina, task)),
    );
    const zeroed = new Set<number>();
    for (const r of results) if (r.status === 'fulfilled') zeroed.add(r.value.threadId);
    this.#channel.close();
    await this.#piscina.destroy();
    return { workers, zeroed: zeroed.size };
  }
}
