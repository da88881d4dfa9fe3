/**
 * Master re-key inside a worker (RekeyMasterTask): the stored KEK versions and the audit keys of
 * earlier master keys rewrapped under the new master key's KEK-wrapping key, and this worker's
 * audit key added to them, so that every stream it signed still verifies once only the new master
 * key is known. Only wrapped bytes leave: the caller stores them in one transaction. The cost
 * depends on the number of KEK versions, never on the number of DEKs.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import {
  auditKeyIdentity,
  kekIdentity,
  type SealFormat,
  WRAP_KIND_AUDIT_KEY,
  WRAP_KIND_KEK,
  wrappedKeyBytes,
} from '../src/format.js';
import type {
  CheckMasterKeyResult,
  CheckMasterKeyTask,
  RekeyMasterResult,
  RekeyMasterTask,
  WrappedAuditKey,
} from '../src/worker-abi/index.js';
import { AuthFailure, unwrapKeyInto, wrapKeyInto } from './aead.js';
import { auditKeyId } from './audit-stream.js';
import { WorkerFault } from './fault.js';
import { KeyArena } from './key-arena.js';
import type { WorkerKeyring } from './keyring.js';
import { loadRootKeys } from './master-key.js';

const KCV_LABEL = 'progressdb/kek-wrap-check/v1';
const KCV_BYTES = 16;

/**
 * Not secret: a truncated HMAC under a KEK-wrapping key proves which key it is, revealing nothing.
 * A copy of its own: a view would take its whole backing buffer along when cloned to the main thread.
 */
export function keyCheckValueOf(kekWrapKey: Buffer): Uint8Array {
  return new Uint8Array(createHmac('sha256', kekWrapKey).update(KCV_LABEL).digest().subarray(0, KCV_BYTES));
}

function wrapUnder(
  format: SealFormat,
  wrapKey: Buffer,
  kind: number,
  identity: string,
  key: Buffer,
): Uint8Array {
  const wrapped = Buffer.alloc(wrappedKeyBytes(format));
  wrapKeyInto(format, wrapKey, kind, 0, identity, key, wrapped, 0);
  return new Uint8Array(wrapped);
}

export function rekeyMaster(
  task: RekeyMasterTask,
  keyring: WorkerKeyring,
  format: SealFormat,
): RekeyMasterResult {
  const current = keyring.roots();
  // Its own small arena: the new root keys live here only while this task runs.
  const arena = new KeyArena(task.auditKeys.length + 4);
  try {
    const next = loadRootKeys(task.newMasterKey, arena);
    const kcv = keyCheckValueOf(next.kekWrapKey);
    if (Buffer.compare(kcv, keyCheckValueOf(current.kekWrapKey)) === 0) {
      throw new WorkerFault('INVALID_INPUT', 'the new master key is the current one: nothing to re-key');
    }
    const keks = task.keks.map((ref) => ({
      version: ref.version,
      wrapped: wrapUnder(
        format,
        next.kekWrapKey,
        WRAP_KIND_KEK,
        kekIdentity(ref.kekId, ref.version),
        keyring.kek(ref.version, task.keks),
      ),
    }));
    // Every audit key the log may be signed with (this worker's own among them), now under the new key.
    const auditKeys: WrappedAuditKey[] = [...auditKeysById(keyring, task.auditKeys, arena)].map(
      ([id, key]) => ({
        id,
        wrapped: wrapUnder(format, next.kekWrapKey, WRAP_KIND_AUDIT_KEY, auditKeyIdentity(id), key),
      }),
    );
    return { keks, kcv, auditKeys };
  } finally {
    arena.zeroAll();
  }
}

/** Whether the master key `task` names has the check value `task.kcv` (a key that cannot be read throws). */
export function checkMasterKey(task: CheckMasterKeyTask): CheckMasterKeyResult {
  const arena = new KeyArena(2);
  try {
    const kcv = keyCheckValueOf(loadRootKeys(task.masterKey, arena).kekWrapKey);
    return { matches: kcv.length === task.kcv.length && timingSafeEqual(kcv, task.kcv) };
  } finally {
    arena.zeroAll();
  }
}

/** The audit keys a verifier may need, by id: earlier master keys' (unwrapped) and the current one's. */
export function auditKeysById(
  keyring: WorkerKeyring,
  earlier: readonly WrappedAuditKey[],
  arena: KeyArena,
): Map<string, Buffer> {
  const { kekWrapKey, auditKey } = keyring.roots();
  const keys = new Map<string, Buffer>([[auditKeyId(auditKey), auditKey]]);
  for (const k of earlier) {
    const slot = arena.alloc();
    try {
      unwrapKeyInto(kekWrapKey, WRAP_KIND_AUDIT_KEY, 0, auditKeyIdentity(k.id), k.wrapped, slot);
    } catch (err) {
      arena.free(slot);
      if (!(err instanceof AuthFailure)) throw err;
      throw new WorkerFault(
        'MASTER_KEY_MISMATCH',
        `the master key cannot unwrap the registry's audit key ${k.id}: it is not this directory's current master key (re-keyed since?)`,
      );
    }
    keys.set(k.id, slot);
  }
  return keys;
}
