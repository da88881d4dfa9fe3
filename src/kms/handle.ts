/** What the embedded KMS offers beyond the Kms interface: operations on its own data directory. */
import type { CallContext, Kms, VerifyAuditResult } from '../api/index.js';
import type { RekeyResult } from './rekey.js';
import type { VerifyAuditOptions } from './verify-audit.js';

export type { VerifyAuditOptions } from './verify-audit.js';

/** Options of rekeyMaster(). */
export interface RekeyMasterOptions {
  /** The new master key's file (64 hex characters, mode 0600, as `progressdb-kms keygen` makes). */
  newMasterKeyFile: string;
  /** Accept a new key file that group or others can read (refused by default). */
  allowOpenKeyFile?: boolean;
  /**
   * In a cluster, how long to wait for every live replica to accept the new key before the
   * re-key is withdrawn (default 30 s). Each replica reads the new key file at the same path.
   */
  voteTimeoutMs?: number;
}

export type EmbeddedKmsHandle = Kms & {
  verifyAudit(options?: VerifyAuditOptions): Promise<VerifyAuditResult>;
  reopenAuditLog(): boolean;
  /**
   * Master re-key (rekey.ts): every KEK version rewrapped under the new master key in one
   * transaction; from then on only the new key opens this registry.
   */
  rekeyMaster(options: RekeyMasterOptions, ctx?: CallContext): Promise<RekeyResult>;
};
