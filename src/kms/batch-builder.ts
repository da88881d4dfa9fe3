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

export function buildBatchTask(batch: PendingOp[], bytes: number, plan: BatchPlan): BatchTask {
  const writer = new BatchTaskWriter(batch.length, bytes);
  const deks: DekRef[] = [];
  const dekIndex = new Map<DekRef, number>();
  const kekVersions = new Set<number>();
  const audit: AuditFields[] = [];
  // Ops usually share their audit fields object (same key, op and caller): send each once.
  const auditIndex = new Map<AuditFields, number>();
  const callers: AuditCaller[] = [];
  const callerIndex = new Map<string, number>();
  let lastCaller: AuditCaller | null = null;
  let lastCallerAt = -1;
  const errors: ErrorCode[] = [];
  const { directory, taskNumber, oldestInFlight } = plan;
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
  const indexCaller = (fields: AuditFields): number => {
    const { op, caller, remote } = fields;
    if (
      lastCaller !== null &&
      lastCaller.op === op &&
      lastCaller.caller === caller &&
      lastCaller.remote === remote
    ) {
      return lastCallerAt;
    }
    const key = `${op}\n${caller ?? ''}\n${remote ?? ''}`;
    let at = callerIndex.get(key);
    if (at === undefined) {
      at = callers.push({ op, caller, remote }) - 1;
      callerIndex.set(key, at);
    }
    lastCaller = callers[at] as AuditCaller;
    lastCallerAt = at;
    return at;
  };

  for (let i = 0; i < batch.length; i++) {
    // biome-ignore lint/style/noNonNullAssertion: hot path: indexes within the batch and each op's deks (count < length; reencrypt has two)
    const op = batch[i]!;
    const errorAt = op.preError === null ? -1 : errors.push(op.preError) - 1;
    const first = op.deks[0];
    if (
      directory !== null &&
      first !== undefined &&
      op.deks.length === 1 &&
      (op.kind === OpKind.encrypt || op.kind === OpKind.decrypt) &&
      (op.audit === null || derivable(op.audit, first))
    ) {
      const entry = directory.entryFor(first, op.audit?.threadId, taskNumber, oldestInFlight);
      if (entry >= 0) {
        kekVersions.add(first.kekVersion);
        const callerAt = op.audit === null ? -1 : indexCaller(op.audit);
        writer.add(op.kind, -1, op.input, op.aad, -1, errorAt, entry, directory.generation(entry), callerAt);
        continue;
      }
    }
    let dekAt = -1;
    // Reencrypt needs its two DEK versions adjacent, so they are never shared with other ops.
    if (op.deks.length === 1 && first !== undefined) dekAt = indexDek(first, op.kind === OpKind.generate);
    else if (op.deks.length > 1 && first !== undefined) {
      dekAt = indexDek(first, true);
      // biome-ignore lint/style/noNonNullAssertion: hot path: indexes within the batch and each op's deks (count < length; reencrypt has two)
      indexDek(op.deks[1]!, true);
    }
    if (op.kind === OpKind.generate || op.kind === OpKind.rewrap) needsTarget = true;
    let auditAt = -1;
    if (op.audit !== null) {
      auditAt = auditIndex.get(op.audit) ?? -1;
      if (auditAt < 0) {
        auditAt = audit.push(op.audit) - 1;
        auditIndex.set(op.audit, auditAt);
      }
    }
    writer.add(op.kind, dekAt, op.input, op.aad, auditAt, errorAt);
  }
  if (needsTarget) kekVersions.add(plan.target);
  return writer.finish({
    keks: plan.kekRefs(kekVersions),
    deks,
    targetKekVersion: plan.target,
    audit,
    callers,
    errors,
  });
}
