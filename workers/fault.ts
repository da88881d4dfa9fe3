/**
 * A failure the worker means to report: thrown inside the worker and caught at the task boundary
 * (workers/crypto.ts), where its data (code and message) becomes the task's failed outcome.
 */
import type { ErrorCode, WorkerError } from '../src/worker-abi/index.js';

export class WorkerFault extends Error {
  readonly error: WorkerError;

  constructor(code: ErrorCode, message: string) {
    super(message);
    this.name = 'WorkerFault';
    this.error = { code, message };
  }
}

/** The reportable data of `err`, or null when it is unexpected (a bug, left to surface as such). */
export function faultOf(err: unknown): WorkerError | null {
  return err instanceof WorkerFault ? err.error : null;
}
