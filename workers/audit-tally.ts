/**
 * `audit_data_ops: aggregate`: the encrypt, decrypt and reencrypt ops of one task counted per
 * audit fields object and outcome, then written into the task's block as one line each with the
 * exact count. The main thread shares one fields object per key, op, KEK version and caller, and
 * every line of a block carries the same timestamp, so the lines `each` would write for a tally
 * differ only in their sequence number. The block is still written before the task's results are
 * released: every use of every key is accounted for, and a crash loses no count.
 */
import type { AuditFields } from '../src/worker-abi/index.js';
import { type AuditStream, fieldsPart } from './audit-stream.js';

/** The ops audit_data_ops governs; everything else is audited line by line. */
const DATA_OPS: ReadonlySet<string> = new Set(['encrypt', 'decrypt', 'reencrypt']);

export function isDataOp(fields: AuditFields): boolean {
  return DATA_OPS.has(fields.op);
}

export class AuditTally {
  /** Successes per fields object; Map keeps first-seen order, so lines follow the ops' order. */
  readonly #ok = new Map<AuditFields, number>();
  /**
   * Failures per error code and rendered fields: a failed op's fields may be its own object (an
   * unknown key, a bad argument), so these are matched by value. Failures are the rare case.
   */
  readonly #failed = new Map<string, { fields: AuditFields; code: string; count: number }>();

  add(fields: AuditFields, code: string | null): void {
    if (code === null) {
      this.#ok.set(fields, (this.#ok.get(fields) ?? 0) + 1);
      return;
    }
    const key = `${code}\n${fieldsPart(fields).toString('latin1')}`;
    const tally = this.#failed.get(key);
    if (tally === undefined) this.#failed.set(key, { fields, code, count: 1 });
    else tally.count++;
  }

  /** Adds one line per tally to the stream's open block, then starts over. */
  writeTo(stream: AuditStream, ts: string): void {
    for (const [fields, count] of this.#ok) stream.add(fields, ts, 'ok', null, count);
    for (const { fields, code, count } of this.#failed.values()) stream.add(fields, ts, 'error', code, count);
    this.#ok.clear();
    this.#failed.clear();
  }
}
