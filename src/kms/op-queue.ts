/**
 * Hands ops to the crypto pool, refusing them first when they must not run: the KMS is closed,
 * or the audit log failed (fail closed: one worker's failed audit write stops every key use).
 * With audit off, ops that need no key and no line settle here without a worker trip.
 */
import type { CallContext } from '../api/index.js';
import { type CodedError, type ErrorCode, kmsError } from '../errors.js';
import { type AuditFields, OpKind } from '../worker-abi/index.js';
import type { AuditFile } from './audit-file.js';
import type { CryptoPool, PendingOp } from './pool.js';

/** One op as queued: what the worker runs, its audit line, and an error found before dispatch. */
export type QueuedOp = Omit<PendingOp, 'done'>;

export interface OpOutput {
  output: Buffer;
  keyVersion: number;
}

/** An op that uses no key: it writes its audit line, and fails with `preError` when one is given. */
export function noteOp(audit: AuditFields, preError: ErrorCode | null = null): QueuedOp {
  return { kind: OpKind.note, deks: [], input: null, aad: null, audit, preError };
}

/** The audit fields of one call (who asked comes from the context: a token name, a subject, 'embedded'). */
export function auditFields(
  op: string,
  ctx: CallContext | undefined,
  keyId?: string,
  threadId?: string,
  kekVersion?: number,
): AuditFields {
  return { op, keyId, threadId, kekVersion, caller: ctx?.caller ?? 'embedded', remote: ctx?.remoteAddress };
}

export class OpQueue {
  constructor(
    private readonly pool: CryptoPool,
    private readonly auditFile: AuditFile | null,
    private readonly auditOn: boolean,
    private readonly isClosed: () => boolean,
  ) {}

  /** Queues one op; the callback form lets batch callers avoid a promise per item. */
  enqueue(op: QueuedOp, done: PendingOp['done']): void {
    if (this.isClosed()) {
      done('NOT_READY', null, 0);
      return;
    }
    if (this.auditFile?.failed) {
      done('AUDIT_WRITE_FAILED', null, 0);
      return;
    }
    if (!this.auditOn && (op.kind === OpKind.note || op.preError !== null)) {
      // Nothing to sign and nothing to compute.
      done(op.preError, op.preError === null ? Buffer.alloc(0) : null, 0);
      return;
    }
    // A literal of exactly these fields: every op the pool holds has one shape (the hot path).
    const { kind, deks, input, aad, preError } = op;
    this.pool.enqueue({ kind, deks, input, aad, audit: this.auditOn ? op.audit : null, preError, done });
  }

  /** Runs one op; a pre-dispatch error rejects with `message` (after its audit line is written). */
  run(op: QueuedOp, message?: string): Promise<OpOutput> {
    return new Promise((resolve, reject) => {
      this.enqueue(op, (error, output, keyVersion) => {
        if (error === null) resolve({ output: output as Buffer, keyVersion });
        else reject(kmsError(error, error === op.preError ? message : undefined));
      });
    });
  }

  /** Writes one audit line and uses no key (start, stop, destroys, existing keys). */
  note(audit: AuditFields): Promise<void> {
    return this.run(noteOp(audit)).then(() => undefined);
  }

  /** Audits a refused call, then rejects with its error. */
  auditedFailure<T>(audit: AuditFields, err: CodedError): Promise<T> {
    return this.run(noteOp(audit, err.code), err.message).then(() => {
      throw err;
    });
  }
}
