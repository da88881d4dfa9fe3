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

/**
 * One line's worth of successful data ops: its fields, their rendered line part and the running
 * task's count. A key directory entry keeps one per op and caller across tasks
 * (key-directory-entries.ts), so counting an op is two field writes on an object the op already
 * holds, with no map lookup and no render per task.
 */
export interface AuditSite {
  readonly fields: AuditFields;
  part: Buffer | null;
  count: number;
  /** The tally round that count belongs to. */
  round: number;
}

export function auditSite(fields: AuditFields): AuditSite {
  return { fields, part: null, count: 0, round: 0 };
}

export class AuditTally {
  #round = 1;
  /** The sites counted this round, in first-seen order, so lines follow the ops' order. */
  readonly #counted: AuditSite[] = [];
  /** Sites for fields that came with the task (ops not named by a directory entry): this round only. */
  readonly #taskSites = new Map<AuditFields, AuditSite>();
  /**
   * Failures per error code and rendered fields: a failed op's fields may be its own object (an
   * unknown key, a bad argument), so these are matched by value. Failures are the rare case.
   */
  readonly #failed = new Map<string, { fields: AuditFields; code: string; count: number }>();

  /** Counts one successful data op on `site`. */
  addOk(site: AuditSite): void {
    if (site.round !== this.#round) {
      site.round = this.#round;
      site.count = 0;
      this.#counted.push(site);
    }
    site.count++;
  }

  add(fields: AuditFields, code: string | null): void {
    if (code === null) {
      let site = this.#taskSites.get(fields);
      if (site === undefined) {
        site = auditSite(fields);
        this.#taskSites.set(fields, site);
      }
      this.addOk(site);
      return;
    }
    const key = `${code}\n${fieldsPart(fields).toString('latin1')}`;
    const tally = this.#failed.get(key);
    if (tally === undefined) this.#failed.set(key, { fields, code, count: 1 });
    else tally.count++;
  }

  /** Adds one line per tally to the stream's open block, then starts a new round. */
  writeTo(stream: AuditStream, ts: string): void {
    for (const site of this.#counted) {
      site.part ??= fieldsPart(site.fields);
      stream.addPart(site.part, ts, 'ok', null, site.count);
    }
    for (const { fields, code, count } of this.#failed.values()) stream.add(fields, ts, 'error', code, count);
    this.#counted.length = 0;
    this.#taskSites.clear();
    this.#failed.clear();
    this.#round++;
  }
}
