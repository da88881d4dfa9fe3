/**
 * Errors cross the thread boundary as plain data: a catalogue code and a message safe to show. An
 * Error thrown in a worker reaches the main thread through structured clone, which keeps little of
 * it, so workers return failures instead of throwing them.
 */
import { ERROR_CATALOGUE, type ErrorCode } from '../errors.js';

export type { ErrorCode } from '../errors.js';

export interface WorkerError {
  code: ErrorCode;
  message: string;
}

/** What every worker task answers: its value, or why the whole task failed. */
export type TaskOutcome<T> = { ok: true; value: T } | { ok: false; error: WorkerError };

/** A WorkerError with the catalogue's message unless a more specific one is given. */
export function workerError(code: ErrorCode, message: string = ERROR_CATALOGUE[code].message): WorkerError {
  return { code, message };
}
