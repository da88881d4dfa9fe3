/** The registry's records of the keyring and its rotation (Registry, index.ts). */
import type { WrappedAuditKey } from '../../worker-abi/index.js';
import type { VersionRewrap } from '../dek-versions.js';

/** Where the audit keys of earlier master keys (WrappedAuditKey[]) are kept after a re-key. */
export const AUDIT_KEYS = 'meta/audit-keys';

export interface KekRecord {
  kekId: string;
  version: number;
  wrapped: Uint8Array;
  createdAt: string;
  /** DEK versions wrapped under this KEK version. */
  refs: number;
}

export interface KekMeta {
  kekId: string;
  activeVersion: number;
  createdAt: string;
}

export interface RotationRecord {
  state: 'running' | 'completed';
  target: number;
  /** Last DEK key id processed in the current pass, or null at the start of a pass. */
  cursor: string | null;
  done: number;
  total: number;
  startedAt: string;
  finishedAt: string | null;
}

/** One DEK version rewrapped by the rotation: applied only if the record still holds `from`. */
export interface Rewrap extends VersionRewrap {
  keyId: string;
}

/**
 * A master re-key, committed in one transaction (Registry.rekeyMaster): every KEK version's new
 * wrapped bytes, applied only where the stored bytes are still `from`, the new key check value,
 * applied only over `fromKcv`, and the audit keys of every earlier master key.
 */
export interface MasterRekey {
  keks: { version: number; from: Uint8Array; wrapped: Uint8Array }[];
  fromKcv: Uint8Array | undefined;
  kcv: Uint8Array;
  auditKeys: WrappedAuditKey[];
  /** In a cluster: the vote's record (ClusterRekeyVote), which must still hold `proposed`, becomes `committed`. */
  vote?: { key: string; proposed: unknown; committed: unknown };
}
