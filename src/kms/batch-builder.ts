/**
 * Lays queued ops out as one batch task. An encrypt or decrypt names its key by key directory
 * entry (dek-directory.ts) and its audit line by caller, two small tables shared by the whole task;
 * any other op, or one the directory cannot take, carries its DekRef and AuditFields, each sent
 * once per task however many ops share it.
 */
import type { ErrorCode } from '../errors.js';
import {
  type AuditCaller,
  type AuditFields,
  auditCallerKey,
  type BatchTask,
  BatchTaskWriter,
  type DekRef,
  type KekRef,
  OpKind,
} from '../worker-abi/index.js';
import type { DekDirectory } from './dek-directory.js';
import type { PendingOp } from './pool.js';

export interface BatchPlan {
  /** KEK version that generate and rewrap ops wrap under. */
  target: number;
  kekRefs: (versions: Iterable<number>) => KekRef[];
  directory: DekDirectory | null;
  /** This task's number, and the lowest number of a task not yet settled (see DekDirectory). */
  taskNumber: number;
  oldestInFlight: number;
}

/**
 * Whether `audit` is exactly the line the worker makes from `dek`'s entry and a caller: the data
 * plane's fields for a successful op are.
 */
function derivable(audit: AuditFields, dek: DekRef): boolean {
  return (
    audit.keyId === dek.keyId &&
    audit.kekVersion === dek.kekVersion &&
    audit.detail === undefined &&
    audit.heads === undefined
  );
}

/** One task's tables as its ops are added: each key, audit fields object and caller sent once. */
class TaskTables {
  readonly deks: DekRef[] = [];
  readonly #dekIndex = new Map<DekRef, number>();
  readonly kekVersions = new Set<number>();
  readonly audit: AuditFields[] = [];
  readonly #auditIndex = new Map<AuditFields, number>();
  readonly callers: AuditCaller[] = [];
  readonly #callerIndex = new Map<string, number>();
  #lastCaller: AuditCaller | null = null;
  #lastCallerAt = -1;
  readonly errors: ErrorCode[] = [];

  /** DekRefs are cached per record version, so object identity finds repeats of the same key. */
  dek(dek: DekRef, unique: boolean): number {
    let at = unique ? undefined : this.#dekIndex.get(dek);
    if (at === undefined) {
      at = this.deks.push(dek) - 1;
      if (!unique) this.#dekIndex.set(dek, at);
      if (dek.wrapped.length > 0) this.kekVersions.add(dek.kekVersion);
    }
    return at;
  }

  /** Ops usually share their audit fields object (same key, op and caller). */
  auditFields(fields: AuditFields): number {
    let at = this.#auditIndex.get(fields);
    if (at === undefined) {
      at = this.audit.push(fields) - 1;
      this.#auditIndex.set(fields, at);
    }
    return at;
  }

  /** By value: consecutive ops mostly share a caller, so the last one is checked first. */
  caller(fields: AuditFields): number {
    const { op, caller, remote } = fields;
    const last = this.#lastCaller;
    if (last !== null && last.op === op && last.caller === caller && last.remote === remote) {
      return this.#lastCallerAt;
    }
    const key = auditCallerKey(fields);
    let at = this.#callerIndex.get(key);
    if (at === undefined) {
      at = this.callers.push({ op, caller, remote }) - 1;
      this.#callerIndex.set(key, at);
    }
    this.#lastCaller = this.callers[at] as AuditCaller;
    this.#lastCallerAt = at;
    return at;
  }
}

/** The directory entry an encrypt or decrypt can name its key by, or -1 to send its DekRef. */
function entryOf(op: PendingOp, plan: BatchPlan): number {
  const first = op.deks[0];
  if (
    plan.directory === null ||
    first === undefined ||
    op.deks.length !== 1 ||
    (op.kind !== OpKind.encrypt && op.kind !== OpKind.decrypt) ||
    (op.audit !== null && !derivable(op.audit, first))
  ) {
    return -1;
  }
  return plan.directory.entryFor(first, op.audit?.threadId, plan.taskNumber, plan.oldestInFlight);
}

export function buildBatchTask(batch: PendingOp[], bytes: number, plan: BatchPlan): BatchTask {
  const writer = new BatchTaskWriter(batch.length, bytes);
  const tables = new TaskTables();
  let needsTarget = false;
  for (let i = 0; i < batch.length; i++) {
    // biome-ignore lint/style/noNonNullAssertion: hot path: indexes within the batch and each op's deks (count < length; reencrypt has two)
    const op = batch[i]!;
    const errorAt = op.preError === null ? -1 : tables.errors.push(op.preError) - 1;
    const entry = entryOf(op, plan);
    if (entry >= 0) {
      // biome-ignore lint/style/noNonNullAssertion: entryOf() takes only ops with one DekRef
      tables.kekVersions.add(op.deks[0]!.kekVersion);
      const callerAt = op.audit === null ? -1 : tables.caller(op.audit);
      const generation = (plan.directory as DekDirectory).generation(entry);
      writer.add(op.kind, -1, op.input, op.aad, -1, errorAt, entry, generation, callerAt);
      continue;
    }
    let dekAt = -1;
    const [first, second] = op.deks;
    // Reencrypt needs its two DEK versions adjacent, so they are never shared with other ops.
    if (second !== undefined && first !== undefined) {
      dekAt = tables.dek(first, true);
      tables.dek(second, true);
    } else if (first !== undefined) dekAt = tables.dek(first, op.kind === OpKind.generate);
    if (op.kind === OpKind.generate || op.kind === OpKind.rewrap) needsTarget = true;
    const auditAt = op.audit === null ? -1 : tables.auditFields(op.audit);
    writer.add(op.kind, dekAt, op.input, op.aad, auditAt, errorAt);
  }
  if (needsTarget) tables.kekVersions.add(plan.target);
  const { deks, audit, callers, errors } = tables;
  return writer.finish({
    keks: plan.kekRefs(tables.kekVersions),
    deks,
    targetKekVersion: plan.target,
    audit,
    callers,
    errors,
  });
}
