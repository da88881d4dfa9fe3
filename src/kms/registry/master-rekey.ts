/**
 * The transaction of a master re-key (src/kms/rekey.ts): at every instant exactly one master key
 * opens the registry, because the KEK versions and the key check value change together.
 */
import { kmsError } from '../../errors.js';
import { KCV, KEK_META, kekKey, ROTATION } from './keys.js';
import {
  AUDIT_KEYS,
  type KekMeta,
  type KekRecord,
  type MasterRekey,
  type RotationRecord,
} from './records.js';
import { type StoreTxnView, sameValue } from './store.js';

/**
 * Rewraps every KEK version and swaps the key check value. CONFLICT if the keyring changed since
 * the re-key read it: a KEK version's bytes, the KCV, a KEK version made since (another replica's
 * rotation), or, in a cluster, the vote's record no longer holding the proposal (its process lost
 * its lease, and the replicas went back to the current key).
 */
export function applyMasterRekey(tx: StoreTxnView, rekey: MasterRekey): void {
  if ((tx.get(ROTATION) as RotationRecord | undefined)?.state === 'running') {
    throw kmsError('ROTATION_IN_PROGRESS', 'a KEK rotation is running: re-key once it has finished');
  }
  const conflict = () => kmsError('CONFLICT', 'the keyring changed during the re-key: run it again');
  if (!sameValue(tx.get(KCV), rekey.fromKcv)) throw conflict();
  const active = (tx.get(KEK_META) as KekMeta | undefined)?.activeVersion;
  if (active !== undefined && !rekey.keks.some((k) => k.version === active)) throw conflict();
  for (const { version, from, wrapped } of rekey.keks) {
    const kek = tx.get(kekKey(version)) as KekRecord | undefined;
    if (kek === undefined || !sameValue(kek.wrapped, from)) throw conflict();
    tx.put(kekKey(version), { ...kek, wrapped });
  }
  tx.put(KCV, rekey.kcv);
  tx.put(AUDIT_KEYS, rekey.auditKeys);
  const vote = rekey.vote;
  if (vote !== undefined) {
    if (!sameValue(tx.get(vote.key), vote.proposed)) {
      throw kmsError(
        'CONFLICT',
        'the re-key proposal is gone (its process lost its etcd lease, and the replicas went back to the current key): run it again',
      );
    }
    tx.put(vote.key, vote.committed);
  }
}
