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
 *
 * In a cluster every live process must have switched too before the commit: the re-key is put to
 * a vote (ClusterRekeyVote, cluster-rekey-follower.ts has the replicas' side) and commits only
 * once each has answered that it reads the new key and accepts both. A refusal, a silent replica
 * or the loss of this process (its proposal lapses with its lease) leaves the registry as it was,
 * and the replicas go back to the current key.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import type { CallContext } from '../api/index.js';
import { kmsError, toCodedError } from '../errors.js';
import {
  type AuditFields,
  describeMasterKeyRef,
  type KekRef,
  type MasterKeyRef,
  type RekeyMasterResult,
  type RekeyMasterTask,
  switchMasterKey,
} from '../worker-abi/index.js';
import type { RekeyFollowerDeps } from './cluster-rekey-follower.js';
import type { RekeyMasterOptions } from './handle.js';
import { auditFields, type OpQueue } from './op-queue.js';
import { type RekeyRecord, sameValue } from './registry/store.js';

export interface RekeyDeps extends RekeyFollowerDeps {
  queue: OpQueue;
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

/** How long a cluster re-key waits for every replica's answer by default (RekeyMasterOptions.voteTimeoutMs). */
export const DEFAULT_REKEY_VOTE_TIMEOUT_MS = 30_000;

export async function rekeyMaster(
  deps: RekeyDeps,
  next: MasterKeyRef,
  ctx: CallContext | undefined,
  voteTimeoutMs = DEFAULT_REKEY_VOTE_TIMEOUT_MS,
): Promise<RekeyResult> {
  const { registry, queue } = deps;
  const current = deps.current();
  const audit: AuditFields = {
    ...auditFields('rekey_master', ctx),
    detail: `to ${describeMasterKeyRef(next)}`,
  };
  if (registry.rotation()?.state === 'running') {
    return queue.auditedFailure(
      audit,
      kmsError('ROTATION_IN_PROGRESS', 'a KEK rotation is running: re-key once it has finished'),
    );
  }
  const keks = registry
    .keks()
    .map((record) => deps.kekRef(record.version))
    .filter((ref): ref is KekRef => ref !== undefined);
  const fromKcv = await registry.kcv();
  const earlier = await registry.auditKeys();
  const prepared = await deps.runInWorker({
    type: 'rekey-master',
    newMasterKey: next,
    keks,
    auditKeys: earlier,
    audit: { ...audit, detail: `${audit.detail}: ${keks.length} KEK versions rewrapped, committing` },
  });
  const vote = registry.cluster?.rekey;
  const proposal =
    vote === undefined
      ? undefined
      : proposalOf(registry.cluster?.replicaId ?? '', next, prepared.kcv, fromKcv);
  switchMasterKey(deps.masterKeySwitch, next, true);
  try {
    if (vote !== undefined && proposal !== undefined) {
      await vote.propose(proposal);
      await vote.awaitAnswers(proposal.id, voteTimeoutMs);
    }
    await registry.rekeyMaster({
      keks: prepared.keks.map((k) => ({
        version: k.version,
        from: keks.find((ref) => ref.version === k.version)?.wrapped ?? new Uint8Array(0),
        wrapped: k.wrapped,
      })),
      fromKcv,
      kcv: prepared.kcv,
      auditKeys: prepared.auditKeys,
      ...(vote !== undefined &&
        proposal !== undefined && {
          vote: { key: vote.key, proposed: proposal, committed: committedOf(proposal) },
        }),
    });
  } catch (err) {
    // An etcd commit whose answer was lost may have applied: the registry's KCV tells. Unreadable,
    // both keys stay accepted here (the withdrawal is a no-op on a committed record).
    const stored = await registry.kcv().catch(() => null);
    if (stored === null || !sameValue(stored, prepared.kcv)) {
      if (stored !== null) switchMasterKey(deps.masterKeySwitch, current, false);
      if (proposal !== undefined) await vote?.withdraw(proposal.id);
      return queue.auditedFailure(audit, toCodedError(err));
    }
  }
  switchMasterKey(deps.masterKeySwitch, next, false);
  deps.adopt(next);
  const everywhere =
    vote === undefined ? '' : ', every live replica of the cluster having accepted the new key';
  await queue.note({ ...audit, detail: `${audit.detail}: committed${everywhere}` });
  deps.log.warn(
    `master key re-keyed: ${keks.length} KEK versions now wrapped under ${describeMasterKeyRef(next)}${everywhere}. ` +
      `Configure that key for the next start (the old one is now refused with MASTER_KEY_MISMATCH) and destroy the old key.`,
  );
  return { kekVersions: keks.length, auditKeys: prepared.auditKeys.length };
}

function proposalOf(
  by: string,
  target: MasterKeyRef,
  kcv: Uint8Array,
  fromKcv: Uint8Array | undefined,
): RekeyRecord {
  return {
    id: randomUUID(),
    by,
    state: 'proposed',
    target,
    kcv: new Uint8Array(kcv),
    fromKcv: new Uint8Array(fromKcv ?? []),
    proposedAt: new Date().toISOString(),
  };
}

function committedOf(proposal: RekeyRecord): RekeyRecord {
  return { ...proposal, state: 'committed', committedAt: new Date().toISOString() };
}
