/**
 * Master re-key: the remedy for a leaked master key. Every KEK version, and the audit keys of
 * earlier master keys, are rewrapped under the new master key in a worker (workers/rekey.ts) and
 * committed in one registry transaction. DEKs are wrapped under the KEKs, not the master key, so
 * the time does not depend on how many there are.
 *
 * Crash-safe because the commit is one transaction: before it the old master key opens the
 * registry (its key check value), after it only the new one, and a kill at any point leaves one of
 * the two states. While it runs the workers accept both keys for unwrapping (master-key-switch.ts):
 * the switch comes before the commit, so no task sees the new wrapped bytes without the key that
 * opens them, and it is switched back if the commit fails.
 */
import path from 'node:path';
import type { CallContext } from '../api/index.js';
import { kmsError, toCodedError } from '../errors.js';
import type { Logger } from '../log.js';
import {
  type AuditFields,
  describeMasterKeyRef,
  type KekRef,
  type MasterKeyRef,
  type RekeyMasterResult,
  type RekeyMasterTask,
  switchMasterKey,
} from '../worker-abi/index.js';
import type { RekeyMasterOptions } from './handle.js';
import { auditFields, type OpQueue } from './op-queue.js';
import type { Registry } from './registry/index.js';

export interface RekeyDeps {
  registry: Registry;
  log: Logger;
  queue: OpQueue;
  masterKeySwitch: SharedArrayBuffer;
  kekRef(version: number): KekRef | undefined;
  /** Runs the worker step; its audit line counts like a batch's. */
  runInWorker(task: RekeyMasterTask): Promise<RekeyMasterResult>;
}

/** The master key a re-key moves to: always a key file (the source to use in production). */
export function rekeyTarget(options: RekeyMasterOptions): MasterKeyRef {
  const next: MasterKeyRef = { kind: 'file', path: path.resolve(options.newMasterKeyFile) };
  if (options.allowOpenKeyFile === true) next.allowOpen = true;
  return next;
}

export interface RekeyResult {
  kekVersions: number;
  /** Audit keys now kept for the log's older streams (one per earlier master key). */
  auditKeys: number;
}

export async function rekeyMaster(
  deps: RekeyDeps,
  current: MasterKeyRef,
  next: MasterKeyRef,
  ctx: CallContext | undefined,
  /** The offline command: every replica of a cluster is stopped, so a cluster may be re-keyed. */
  offline: boolean,
): Promise<RekeyResult> {
  const { registry, queue } = deps;
  const audit: AuditFields = {
    ...auditFields('rekey_master', ctx),
    detail: `to ${describeMasterKeyRef(next)}`,
  };
  if (registry.cluster !== undefined && !offline) {
    return queue.auditedFailure(
      audit,
      kmsError(
        'CONFIG_INVALID',
        'a cluster replica cannot re-key the master key online (the other replicas still hold the old one): ' +
          'stop every replica, run progressdb-kms rekey against the registry, then start them with the new key',
      ),
    );
  }
  if (registry.rotation()?.state === 'running') {
    return queue.auditedFailure(
      audit,
      kmsError('ROTATION_IN_PROGRESS', 'a KEK rotation is running: re-key once it has finished'),
    );
  }
  const keks: KekRef[] = [];
  for (const record of registry.keks()) {
    const ref = deps.kekRef(record.version);
    if (ref !== undefined) keks.push(ref);
  }
  const fromKcv = await registry.kcv();
  const earlier = await registry.auditKeys();
  const prepared = await deps.runInWorker({
    type: 'rekey-master',
    newMasterKey: next,
    keks,
    auditKeys: earlier,
    audit: { ...audit, detail: `${audit.detail}: ${keks.length} KEK versions rewrapped, committing` },
  });
  switchMasterKey(deps.masterKeySwitch, next, true);
  try {
    await registry.rekeyMaster({
      keks: prepared.keks.map((k) => ({
        version: k.version,
        from: keks.find((ref) => ref.version === k.version)?.wrapped ?? new Uint8Array(0),
        wrapped: k.wrapped,
      })),
      fromKcv,
      kcv: prepared.kcv,
      auditKeys: prepared.auditKeys,
    });
  } catch (err) {
    switchMasterKey(deps.masterKeySwitch, current, false);
    return queue.auditedFailure(audit, toCodedError(err));
  }
  switchMasterKey(deps.masterKeySwitch, next, false);
  await queue.note({ ...audit, detail: `${audit.detail}: committed` });
  deps.log.warn(
    `master key re-keyed: ${keks.length} KEK versions now wrapped under ${describeMasterKeyRef(next)}. ` +
      `Configure that key for the next start (the old one is now refused with MASTER_KEY_MISMATCH) and destroy the old key.`,
  );
  return { kekVersions: keks.length, auditKeys: prepared.auditKeys.length };
}
