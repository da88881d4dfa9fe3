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
import type { StreamHead } from '../audit-link.js';
import { type ErrorCode, toCodedError } from '../errors.js';
import {
  type AuditFields,
  type BatchResult,
  type BatchTask,
  type DekRef,
  IDLE_SPIN_SIGNAL_BYTES,
  IDLE_SPIN_WORKER_SLOTS,
  IdleSpinSlot,
  type KekRef,
  OP_SLOTS,
  OpKind,
  type OpKindValue,
  opSlotBytes,
  PLAINTEXT_LEAD,
  RESULT_SLOTS,
  type WorkerInit,
  type WorkerTask,
  type ZeroizeResult,
  type ZeroizeTask,
} from '../protocol.js';

/** Settles one op: `error` null on success, with the output bytes and the DEK version used. */
export type OpCallback = (error: ErrorCode | null, output: Buffer | null, keyVersion: number) => void;

export interface PendingOp {
  kind: OpKindValue;
  /** For reencrypt: [current, source]. For generate: a template (wrapped is empty). */
  deks: DekRef[];
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
  onAudit: (failed: boolean, head: StreamHead | undefined) => void;
  activeKekVersion: () => number;
}

/** Smallest share of a burst worth a task of its own when splitting it across idle workers. */
const MIN_SPLIT_OPS = 8;

/** Bytes packed into one task before it leaves even if it has fewer than maxBatch ops. */
const MAX_TASK_BYTES = 1 << 20;

const EMPTY = new Uint8Array(0);

/** Bytes an op takes in its task's buffer: its slot (input and output room) and its AAD. */
function opBytes(op: PendingOp): number {
  return opSlotBytes(op.kind, op.input?.length ?? 0) + (op.aad?.length ?? 0);
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

/** Maps an error thrown in a worker (`[CODE] message`) back to a CodedError. */
export function fromWorkerError(err: unknown): ReturnType<typeof toCodedError> {
  const message = err instanceof Error ? err.message : String(err);
  const match = /^\[([A-Z_]+)\] ([\s\S]*)$/.exec(message);
  if (match) return toCodedError({ code: match[1], message: match[2] });
  return toCodedError(err);
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

  constructor(opts: PoolOptions) {
    this.#opts = opts;
    const signal = new SharedArrayBuffer(IDLE_SPIN_SIGNAL_BYTES);
    const idleSpin =
      opts.idleSpinUs > 0 ? { signal, budgetUs: opts.idleSpinUs, cores: availableParallelism() } : null;
    this.#piscina = new Piscina({
      filename: workerFile('crypto'),
      minThreads: opts.threads,
      maxThreads: opts.threads,
      idleTimeout: Number.POSITIVE_INFINITY,
      // A worker holds its next task while it runs one, so it never idles waiting for the main
      // thread to hand it more work.
      concurrentTasksPerWorker: 2,
      loadBalancer: spinAwareBalancer(new Int32Array(signal), 2),
      workerData: { ...opts.init, idleSpin } satisfies WorkerInit,
      // Without it, deep queues starve some tasks for hundreds of ms.
      stricterFIFO: true,
      // 'sync' (the default) parks idle workers in a blocking Atomics.wait, so they never run
      // their BroadcastChannel handler: evicted keys stayed cached and close() never got the
      // zeroize acknowledgement (keys not zeroed, close stalled for the 2 s timeout).
      atomics: 'async',
    });
    this.#maxInFlight = opts.threads * 2;
    this.#channel = new BroadcastChannel(opts.init.evictChannel);
    this.#channel.unref();
  }

  get threads(): number {
    return this.#piscina.threads.length;
  }

  /** Ops waiting for a task plus tasks waiting for a worker. */
  get queueDepth(): number {
    return this.#queue.length + this.#piscina.queueSize;
  }

  /** Runs a non-batch task (KEK creation, start-up check, audit verification). */
  async run<T>(task: WorkerTask): Promise<T> {
    try {
      return (await this.#piscina.run(task)) as T;
    } catch (err) {
      throw fromWorkerError(err);
    }
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
  async runBulk(kind: OpKindValue, deks: DekRef[], audit: AuditFields | null): Promise<BatchResult> {
    const count = deks.length + (audit === null ? 0 : 1);
    const ops = new Int32Array(count * OP_SLOTS).fill(-1);
    const kekVersions = new Set<number>([this.#opts.activeKekVersion()]);
    const slot = opSlotBytes(kind, 0);
    for (let i = 0; i < deks.length; i++) {
      const base = i * OP_SLOTS;
      ops[base] = kind;
      ops[base + 1] = i;
      ops[base + 2] = ops[base + 3] = ops[base + 4] = ops[base + 5] = 0;
      ops[base + 8] = i * slot;
      kekVersions.add(deks[i]!.kekVersion);
    }
    if (audit !== null) {
      const base = deks.length * OP_SLOTS;
      ops[base] = OpKind.note;
      ops[base + 2] = ops[base + 3] = ops[base + 4] = ops[base + 5] = 0;
      ops[base + 6] = 0;
      ops[base + 8] = deks.length * slot;
    }
    const task: BatchTask = {
      type: 'batch',
      keks: this.#kekRefs(kekVersions),
      deks,
      targetKekVersion: this.#opts.activeKekVersion(),
      ops,
      data: new ArrayBuffer(deks.length * slot),
      audit: audit === null ? [] : [audit],
      errors: [],
    };
    this.#inFlight++;
    try {
      const transferList = [task.data, ops.buffer as ArrayBuffer];
      const result = (await this.#piscina.run(task, { transferList })) as BatchResult;
      if (result.audited || result.errors.includes('AUDIT_WRITE_FAILED')) {
        this.#opts.onAudit(!result.audited, result.auditHead);
      }
      return result;
    } catch (err) {
      throw fromWorkerError(err);
    } finally {
      this.#taskDone();
    }
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
    const data = new Uint8Array(new ArrayBuffer(bytes));
    const ops = new Int32Array(batch.length * OP_SLOTS);
    const deks: DekRef[] = [];
    const dekIndex = new Map<DekRef, number>();
    const kekVersions = new Set<number>();
    const audit: AuditFields[] = [];
    // Ops usually share their audit fields object (same key, op and caller): send each once.
    const auditIndex = new Map<AuditFields, number>();
    const errors: ErrorCode[] = [];
    const target = this.#opts.activeKekVersion();
    let pos = 0;
    let needsTarget = false;

    // DekRefs are cached per record version, so object identity finds repeats of the same key.
    const indexDek = (dek: DekRef, unique: boolean): number => {
      let at = unique ? undefined : dekIndex.get(dek);
      if (at === undefined) {
        at = deks.push(dek) - 1;
        if (!unique) dekIndex.set(dek, at);
        if (dek.wrapped.length > 0) kekVersions.add(dek.kekVersion);
      }
      return at;
    };

    for (let i = 0; i < batch.length; i++) {
      const op = batch[i]!;
      const base = i * OP_SLOTS;
      ops[base] = op.kind;
      // Reencrypt needs its two DEK versions adjacent, so they are never shared with other ops.
      if (op.deks.length === 0) ops[base + 1] = -1;
      else if (op.deks.length === 1) ops[base + 1] = indexDek(op.deks[0]!, op.kind === OpKind.generate);
      else {
        ops[base + 1] = indexDek(op.deks[0]!, true);
        indexDek(op.deks[1]!, true);
      }
      if (op.kind === OpKind.generate || op.kind === OpKind.rewrap) needsTarget = true;
      // The op's slot: its input, placed so that the worker can write the output over it.
      const input = op.input ?? EMPTY;
      const inputAt = op.kind === OpKind.encrypt ? pos + PLAINTEXT_LEAD : pos;
      data.set(input, inputAt);
      ops[base + 2] = inputAt;
      ops[base + 3] = input.length;
      ops[base + 8] = pos;
      pos += opSlotBytes(op.kind, input.length);
      const aad = op.aad ?? EMPTY;
      data.set(aad, pos);
      ops[base + 4] = pos;
      ops[base + 5] = aad.length;
      pos += aad.length;
      if (op.audit === null) ops[base + 6] = -1;
      else {
        let at = auditIndex.get(op.audit);
        if (at === undefined) {
          at = audit.push(op.audit) - 1;
          auditIndex.set(op.audit, at);
        }
        ops[base + 6] = at;
      }
      ops[base + 7] = op.preError === null ? -1 : errors.push(op.preError) - 1;
    }
    if (needsTarget) kekVersions.add(target);
    const task: BatchTask = {
      type: 'batch',
      keks: this.#kekRefs(kekVersions),
      deks,
      targetKekVersion: target,
      ops,
      data: data.buffer as ArrayBuffer,
      audit,
      errors,
    };
    this.#inFlight++;
    // The bytes move, never copied: measured cheaper at every size from one op up.
    this.#piscina.run(task, { transferList: [task.data, ops.buffer as ArrayBuffer] }).then(
      (result: BatchResult) => this.#settle(batch, result),
      (err: unknown) => this.#fail(batch, err),
    );
  }

  #settle(batch: PendingOp[], result: BatchResult): void {
    this.#taskDone();
    const { results, out, errors, audited } = result;
    if (audited || errors.includes('AUDIT_WRITE_FAILED')) this.#opts.onAudit(!audited, result.auditHead);
    for (let i = 0; i < batch.length; i++) {
      const r = i * RESULT_SLOTS;
      const errorAt = results[r]!;
      if (errorAt >= 0) batch[i]!.done(errors[errorAt] ?? 'INTERNAL', null, 0);
      else batch[i]!.done(null, Buffer.from(out, results[r + 1]!, results[r + 2]!), results[r + 3]!);
    }
  }

  #fail(batch: PendingOp[], err: unknown): void {
    this.#taskDone();
    const code = fromWorkerError(err).code;
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
   * Zeroes every key in every worker, then stops the threads. Returns how many workers confirmed.
   * One zeroize task per worker: the balancer hands each of N tasks posted together to a different
   * idle worker, and a task also reaches a worker still loading its code (a broadcast would be lost
   * there, and close() used to wait in vain for its acknowledgement).
   */
  async close(): Promise<{ workers: number; zeroed: number }> {
    await this.idle();
    const workers = this.#piscina.threads.length;
    const task: ZeroizeTask = { type: 'zeroize' };
    const results = await Promise.allSettled(Array.from({ length: workers }, () => this.#piscina.run(task)));
    const zeroed = new Set<number>();
    for (const r of results) if (r.status === 'fulfilled') zeroed.add((r.value as ZeroizeResult).threadId);
    this.#channel.close();
    await this.#piscina.destroy();
    return { workers, zeroed: zeroed.size };
  }
}
