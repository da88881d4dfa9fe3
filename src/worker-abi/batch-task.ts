/**
 * The one writer (pool) and reader (worker) of a batch task's op slots. Both work in place on the
 * task's buffers, with no object per op: this is the hot path.
 */
import {
  kOpAadLength,
  kOpAadOffset,
  kOpAuditIndex,
  kOpCallerIndex,
  kOpDekIndex,
  kOpEntryGeneration,
  kOpEntryIndex,
  kOpErrorIndex,
  kOpInputLength,
  kOpInputOffset,
  kOpKind,
  kOpOutputOffset,
  OP_SLOTS,
  OpKind,
  type OpKindValue,
  opSlotBytes,
  PLAINTEXT_LEAD,
} from './slots.js';
import type { AuditFields, BatchTask, DekRef } from './tasks.js';

/** The parts of a task that are not op slots: keys, audit fields and pre-dispatch error codes. */
export type BatchTaskTables = Omit<BatchTask, 'type' | 'ops' | 'data'>;

export class BatchTaskWriter {
  readonly #ops: Int32Array;
  readonly #data: Uint8Array;
  #count = 0;
  #pos = 0;

  /** `dataBytes`: the sum of bytesFor() over the ops to come. */
  constructor(opCount: number, dataBytes: number) {
    this.#ops = new Int32Array(opCount * OP_SLOTS);
    this.#data = new Uint8Array(new ArrayBuffer(dataBytes));
  }

  /** Bytes an op takes in the task's buffer: its slot (input and output room) and its AAD. */
  static bytesFor(kind: number, inputLength: number, aadLength: number): number {
    return opSlotBytes(kind, inputLength) + aadLength;
  }

  /**
   * Lays out the next op: its input placed so that the worker can write the output over it, then
   * its AAD. `dekIndex`, `auditIndex` and `errorIndex` are -1 when absent. An op whose key is a
   * key directory entry gives it as `entry` (index and generation) and its audit caller as
   * `callerIndex`, with `dekIndex` and `auditIndex` -1.
   */
  add(
    kind: OpKindValue,
    dekIndex: number,
    input: Uint8Array | null,
    aad: Uint8Array | null,
    auditIndex: number,
    errorIndex: number,
    entryIndex = -1,
    entryGeneration = 0,
    callerIndex = -1,
  ): void {
    const ops = this.#ops;
    const base = this.#count++ * OP_SLOTS;
    const pos = this.#pos;
    const inputLength = input?.length ?? 0;
    const inputAt = kind === OpKind.encrypt ? pos + PLAINTEXT_LEAD : pos;
    if (input !== null) this.#data.set(input, inputAt);
    const aadAt = pos + opSlotBytes(kind, inputLength);
    const aadLength = aad?.length ?? 0;
    if (aad !== null) this.#data.set(aad, aadAt);
    ops[base + kOpKind] = kind;
    ops[base + kOpDekIndex] = dekIndex;
    ops[base + kOpInputOffset] = inputAt;
    ops[base + kOpInputLength] = inputLength;
    ops[base + kOpAadOffset] = aadAt;
    ops[base + kOpAadLength] = aadLength;
    ops[base + kOpAuditIndex] = auditIndex;
    ops[base + kOpErrorIndex] = errorIndex;
    ops[base + kOpOutputOffset] = pos;
    ops[base + kOpEntryIndex] = entryIndex;
    ops[base + kOpEntryGeneration] = entryGeneration;
    ops[base + kOpCallerIndex] = callerIndex;
    this.#pos = aadAt + aadLength;
  }

  /** The finished task. Its buffers move to the worker (see transferList), never copied. */
  finish(tables: BatchTaskTables): BatchTask {
    return { type: 'batch', ...tables, ops: this.#ops, data: this.#data.buffer as ArrayBuffer };
  }

  static transferList(task: BatchTask): ArrayBuffer[] {
    return [task.data, task.ops.buffer as ArrayBuffer];
  }
}

export class BatchTaskReader {
  readonly task: BatchTask;
  readonly count: number;
  /**
   * The task's buffer, which the worker writes every op's output into (each over its own slot) and
   * sends back: one allocation per task, made (and zeroed) by the main thread.
   */
  readonly data: Buffer;
  readonly #ops: Int32Array;

  constructor(task: BatchTask) {
    this.task = task;
    this.#ops = task.ops;
    this.count = task.ops.length / OP_SLOTS;
    this.data = Buffer.from(task.data);
  }

  #slot(i: number, slot: number): number {
    return this.#ops[i * OP_SLOTS + slot] as number;
  }

  kind(i: number): number {
    return this.#slot(i, kOpKind);
  }

  /** The op's DEK version (for reencrypt the current one; for generate a template), or null. */
  dek(i: number): DekRef | null {
    const at = this.#slot(i, kOpDekIndex);
    return at >= 0 ? (this.task.deks[at] ?? null) : null;
  }

  /** A reencrypt's second DEK version: the one its ciphertext names. */
  sourceDek(i: number): DekRef | null {
    const at = this.#slot(i, kOpDekIndex);
    return at >= 0 ? (this.task.deks[at + 1] ?? null) : null;
  }

  input(i: number): Buffer {
    const at = this.#slot(i, kOpInputOffset);
    return this.data.subarray(at, at + this.#slot(i, kOpInputLength));
  }

  /** Where the op's input starts in `data`, and its length: input() without making a view. */
  inputOffset(i: number): number {
    return this.#slot(i, kOpInputOffset);
  }

  inputLength(i: number): number {
    return this.#slot(i, kOpInputLength);
  }

  aad(i: number): Buffer | null {
    const length = this.#slot(i, kOpAadLength);
    if (length <= 0) return null;
    const at = this.#slot(i, kOpAadOffset);
    return this.data.subarray(at, at + length);
  }

  audit(i: number): AuditFields | null {
    const at = this.#slot(i, kOpAuditIndex);
    return at >= 0 ? (this.task.audit[at] ?? null) : null;
  }

  /** The op's key directory entry, or -1 when it carries a DekRef (dek()). */
  entryIndex(i: number): number {
    return this.#slot(i, kOpEntryIndex);
  }

  entryGeneration(i: number): number {
    return this.#slot(i, kOpEntryGeneration);
  }

  /** Into `task.callers`: the audit caller of an op whose key is a directory entry, or -1. */
  callerIndex(i: number): number {
    return this.#slot(i, kOpCallerIndex);
  }

  /** The code the op failed with before dispatch, or null. */
  preError(i: number): BatchTask['errors'][number] | null {
    const at = this.#slot(i, kOpErrorIndex);
    return at >= 0 ? (this.task.errors[at] ?? 'INTERNAL') : null;
  }

  /** Where the op's output goes in `data`. */
  outputOffset(i: number): number {
    return this.#slot(i, kOpOutputOffset);
  }

  /** Zeroes the op's slot (after a failure: nothing half-written goes back). */
  clearOutput(i: number): void {
    const at = this.outputOffset(i);
    this.data.fill(0, at, at + opSlotBytes(this.kind(i), this.#slot(i, kOpInputLength)));
  }
}
