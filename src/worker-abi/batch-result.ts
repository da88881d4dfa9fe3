/**
 * The one writer (worker) and reader (pool and KEK rotation) of a batch result's slots. Outputs
 * stay in the task's buffer, where the worker wrote them; nothing is copied or allocated per op.
 */
import type { StreamCheckpoint } from '../audit-checkpoint.js';
import type { StreamHead } from '../audit-link.js';
import type { WorkerError } from './errors.js';
import {
  kResultErrorIndex,
  kResultKeyVersion,
  kResultOutputLength,
  kResultOutputOffset,
  RESULT_SLOTS,
} from './slots.js';
import type { BatchResult } from './tasks.js';

export class BatchResultWriter {
  readonly #results: Int32Array;
  readonly #errors: WorkerError[] = [];

  constructor(opCount: number) {
    this.#results = new Int32Array(opCount * RESULT_SLOTS);
  }

  ok(i: number, outputOffset: number, outputLength: number, keyVersion: number): void {
    const r = i * RESULT_SLOTS;
    this.#results[r + kResultErrorIndex] = -1;
    this.#results[r + kResultOutputOffset] = outputOffset;
    this.#results[r + kResultOutputLength] = outputLength;
    this.#results[r + kResultKeyVersion] = keyVersion;
  }

  fail(i: number, error: WorkerError): void {
    const r = i * RESULT_SLOTS;
    this.#results[r + kResultErrorIndex] = this.#errorIndex(error);
    this.#results[r + kResultOutputOffset] = 0;
    this.#results[r + kResultOutputLength] = 0;
    this.#results[r + kResultKeyVersion] = 0;
  }

  /** Fails every op (the task's audit lines could not be written, so no result may go out). */
  failAll(error: WorkerError): void {
    const count = this.#results.length / RESULT_SLOTS;
    for (let i = 0; i < count; i++) this.fail(i, error);
  }

  /** Each distinct error is sent once, however many ops it failed. */
  #errorIndex(error: WorkerError): number {
    const errors = this.#errors;
    for (let at = 0; at < errors.length; at++) {
      const known = errors[at] as WorkerError;
      if (known.code === error.code && known.message === error.message) return at;
    }
    return errors.push(error) - 1;
  }

  finish(
    out: ArrayBuffer,
    audited: boolean,
    auditHead: StreamHead | undefined,
    auditCheckpoint?: StreamCheckpoint,
  ): BatchResult {
    return { results: this.#results, out, errors: this.#errors, audited, auditHead, auditCheckpoint };
  }

  static transferList(result: BatchResult): ArrayBuffer[] {
    return [result.results.buffer as ArrayBuffer, result.out];
  }
}

export class BatchResultReader {
  readonly result: BatchResult;
  readonly count: number;
  readonly #results: Int32Array;

  constructor(result: BatchResult) {
    this.result = result;
    this.#results = result.results;
    this.count = result.results.length / RESULT_SLOTS;
  }

  /** The op's error, or null when it succeeded. */
  error(i: number): WorkerError | null {
    const at = this.#results[i * RESULT_SLOTS + kResultErrorIndex] as number;
    if (at < 0) return null;
    return this.result.errors[at] ?? { code: 'INTERNAL', message: 'internal error' };
  }

  /** The op's output: a view of the returned buffer, not a copy. */
  output(i: number): Buffer {
    const r = i * RESULT_SLOTS;
    return Buffer.from(
      this.result.out,
      this.#results[r + kResultOutputOffset] as number,
      this.#results[r + kResultOutputLength] as number,
    );
  }

  keyVersion(i: number): number {
    return this.#results[i * RESULT_SLOTS + kResultKeyVersion] as number;
  }

  /** Whether an audit write failed in this task (the worker then refuses everything after it). */
  get auditFailed(): boolean {
    return this.result.errors.some((e) => e.code === 'AUDIT_WRITE_FAILED');
  }
}
