/**
 * The task shapes the main thread hands the crypto workers and what they answer. Only wrapped keys,
 * plaintext and ciphertext cross; never an unwrapped key. Internal: not part of the library API.
 */

import type { StreamCheckpoint } from '../audit-checkpoint.js';
import type { AuditHeadRecord, StreamHead } from '../audit-link.js';
import type { CipherName } from '../format.js';
import type { ErrorCode, WorkerError } from './errors.js';
import type { KeyDirectoryInit } from './key-directory.js';

// A library result as well (EmbeddedKmsHandle.verifyAudit); a type only, so no runtime dependency.
export type { VerifyAuditResult } from '../api/kms.js';

/** How the worker finds the master key. The main thread only ever holds this reference. */
export type MasterKeyRef =
  /** `allowOpen`: accept a file that group or others can access (refused by default). */
  | { kind: 'file'; path: string; allowOpen?: boolean }
  | { kind: 'env'; name: string }
  /**
   * Discouraged: hex in a config file (`master_key`). The worker reads the `length` bytes at
   * `offset` (the value as written, quotes included), which the config layer located.
   */
  | { kind: 'config'; path: string; offset: number; length: number };

/** Names a master key source in messages (never its value). */
export function describeMasterKeyRef(ref: MasterKeyRef): string {
  switch (ref.kind) {
    case 'file':
      return `master key file ${ref.path}`;
    case 'env':
      return `environment variable ${ref.name}`;
    case 'config':
      return `master_key in config file ${ref.path}`;
  }
}

/** Where the worker finds the audit signing key (Ed25519); the main thread only holds the path. */
export interface AuditSigningKeyRef {
  path: string;
  /** Accept a file that group or others can access (as for the master key file). */
  allowOpen: boolean;
}

/** When a stream writes a signed checkpoint (src/audit-checkpoint.ts). */
export interface AuditCheckpointPolicy {
  signingKey: AuditSigningKeyRef;
  /** After this many lines not yet covered by a checkpoint. */
  lines: number;
  /** Or once the oldest line not yet covered is this old (checked at each block). */
  ms: number;
}

/** How data-plane operations are audited (see WorkerInit.auditDataOps). */
export const AUDIT_DATA_OPS = ['each', 'aggregate'] as const;
export type AuditDataOps = (typeof AUDIT_DATA_OPS)[number];

export interface WorkerInit {
  masterKey: MasterKeyRef;
  /** Max unwrapped DEK versions cached per worker (LRU, zeroed on eviction). */
  dekCacheSize: number;
  /** The key directory data ops name their keys in (key-directory.ts); null: DekRefs only. */
  keyDirectory: KeyDirectoryInit | null;
  /** The cipher new ciphertexts and wrapped keys are written in; every format is read. */
  cipher: CipherName;
  /** Name of the BroadcastChannel on which the main thread announces destroyed keys. */
  evictChannel: string;
  /**
   * The audit log each worker appends its signed blocks to (O_APPEND, one write per block, before
   * the task's results are released), or null when auditing is off.
   */
  auditFile: string | null;
  /**
   * Bumped by the main thread (Atomics) whenever it opens a new live audit file (rollover,
   * SIGHUP): a worker that sees it change reopens `auditFile` before its next block. Null with
   * auditing off.
   */
  auditGeneration: SharedArrayBuffer | null;
  /** fdatasync after every block (auditFsyncMs = 0); otherwise the main thread fsyncs in groups. */
  auditFsyncEachWrite: boolean;
  /**
   * `each`: one line per encrypt, decrypt or reencrypt. `aggregate`: one line per (key, op, KEK
   * version, caller, outcome) in each block, with the exact `count`.
   */
  auditDataOps: AuditDataOps;
  /**
   * Where a master re-key tells the workers of the new master key (master-key-switch.ts); a worker
   * started later reads its master key from here once it has been switched.
   */
  masterKeySwitch: SharedArrayBuffer;
  /** Session link fields for the first line of this worker's stream (src/audit-link.ts), or null. */
  auditLink: string | null;
  /** The replica id each audit line names, when the KMS is a replica of a cluster; else null. */
  auditReplica: string | null;
  /** Signed checkpoints, when an audit signing key is configured; else null (none written). */
  auditCheckpoints: AuditCheckpointPolicy | null;
  /**
   * Shared with the main thread (layout: IdleSpinSlot): lets a worker that just finished a task spin
   * briefly for the next one instead of parking. Null disables spinning.
   */
  idleSpin: { signal: SharedArrayBuffer; budgetUs: number; cores: number } | null;
}

/**
 * What a worker announces on the evict channel when it starts: how much of its key memory the
 * system locked, and the process's RLIMIT_MEMLOCK (null when unlimited or unknown).
 */
export interface KeyMemoryReport {
  type: 'key-memory';
  threadId: number;
  lockedBytes: number;
  unlockedBytes: number;
  memlockLimitBytes: number | null;
}

/** A KEK version as stored: wrapped under the master key. */
export interface KekRef {
  kekId: string;
  version: number;
  wrapped: Uint8Array;
}

/** A DEK version as stored: wrapped under a KEK version. */
export interface DekRef {
  keyId: string;
  keyVersion: number;
  kekVersion: number;
  wrapped: Uint8Array;
}

/** Fields of an audit line that the main thread knows; the worker adds time, outcome and MAC. */
export interface AuditFields {
  op: string;
  keyId?: string | undefined;
  threadId?: string | undefined;
  kekVersion?: number | undefined;
  caller?: string | undefined;
  remote?: string | undefined;
  detail?: string | undefined;
  /** The stop line: every stream's head (formatHeads in src/audit-link.ts). */
  heads?: string | undefined;
}

/**
 * The fields of a data op's audit line that its key does not give: with a key directory entry's
 * key id, thread id and KEK version, they make the same AuditFields the main thread would send.
 */
export interface AuditCaller {
  op: string;
  caller: string | undefined;
  remote: string | undefined;
}

/** A caller's identity by value (an absent caller or remote apart from an empty one). */
export function auditCallerKey(c: Pick<AuditFields, 'op' | 'caller' | 'remote'>): string {
  return JSON.stringify([c.op, c.caller ?? null, c.remote ?? null]);
}

/** Written by BatchTaskWriter (pool), read by BatchTaskReader (worker); see slots.ts. */
export interface BatchTask {
  type: 'batch';
  /** KEK versions the DEKs below (or new wraps) need. */
  keks: KekRef[];
  /** DEK versions used by the ops. For `generate`, a template: keyId, keyVersion, kekVersion. */
  deks: DekRef[];
  /** KEK version that `generate` and `rewrap` ops wrap under. */
  targetKekVersion: number;
  ops: Int32Array;
  /**
   * Every op's slot (input plus room for its output) and AAD, packed; transferred to the worker
   * and back, never copied.
   */
  data: ArrayBuffer;
  audit: AuditFields[];
  /** Audit callers of the ops whose keys are directory entries (kOpCallerIndex). */
  callers: AuditCaller[];
  errors: ErrorCode[];
}

/** Written by BatchResultWriter (worker), read by BatchResultReader (pool); see slots.ts. */
export interface BatchResult {
  results: Int32Array;
  /** The task's `data` buffer, sent back with every op's output written in place. */
  out: ArrayBuffer;
  /** Per-op failures, each sent once however many ops it failed. */
  errors: WorkerError[];
  /** Whether this task appended audit lines (the main thread then schedules a group fsync). */
  audited: boolean;
  /** This worker's stream head after the task, when it appended lines (kept in the registry). */
  auditHead?: StreamHead | undefined;
  /** Its stream's last checkpoint, when it has one (kept in the registry too). */
  auditCheckpoint?: StreamCheckpoint | undefined;
}

/** Creates a KEK version inside the worker and returns it wrapped under the master key. */
export interface NewKekTask {
  type: 'new-kek';
  kekId: string;
  version: number;
  audit: AuditFields;
}

export interface NewKekResult {
  wrapped: Uint8Array;
  /** Key check value of the KEK-wrapping key (see CheckKekTask); stored beside a new keyring. */
  kcv: Uint8Array;
  auditHead?: StreamHead | undefined;
  auditCheckpoint?: StreamCheckpoint | undefined;
}

/**
 * Proves the master key matches the data directory and that the stored KEK versions unwrap. Writes
 * no audit line (see EmbeddedKms.start). The key check value (KCV), an HMAC of a fixed label under
 * the KEK-wrapping key, is not secret; it tells a wrong master key (KCV differs) apart from a
 * corrupt wrapped KEK (KCV matches, unwrap fails: STORE_CORRUPT). A registry written before KCVs
 * sends null and gets the value to store back when the KEKs unwrap.
 */
export interface CheckKekTask {
  type: 'check-kek';
  keks: KekRef[];
  kcv: Uint8Array | null;
}

export interface CheckKekResult {
  /** False: the master key is not this directory's (nothing was unwrapped with a stored KCV). */
  ok: boolean;
  kcv: Uint8Array | null;
}

/** Verifies an audit log file inside a worker (the audit key never leaves it). */
export interface VerifyAuditTask {
  type: 'verify-audit';
  /** The chain's files in order: rolled files, then the live one. */
  paths: string[];
  /**
   * The chain starts at `paths[0]`, older files having been removed (audit verify --from): the
   * streams and session already running there are taken up from their anchors (`prev_mac`).
   */
  trimmed: boolean;
  /** The registry's audit head, which the log's end must match (null: the registry records none). */
  head: AuditHeadRecord | null;
  /** Audit keys of earlier master keys (a re-keyed registry), for the streams they signed. */
  auditKeys: WrappedAuditKey[];
}

/**
 * Writes a checkpoint of the worker's stream if it has lines no checkpoint covers yet: sent to
 * every worker every auditCheckpointMs (a worker left idle would otherwise leave its last lines
 * uncovered) and before the stop line.
 */
export interface AuditCheckpointTask {
  type: 'audit-checkpoint';
}

export interface AuditCheckpointResult {
  audited: boolean;
  auditHead?: StreamHead | undefined;
  auditCheckpoint?: StreamCheckpoint | undefined;
}

/**
 * Zeroes every key the worker holds (at close). Sent as one task per worker rather than broadcast:
 * a task also reaches a worker still loading its code, where a broadcast would be lost.
 */
export interface ZeroizeTask {
  type: 'zeroize';
}

export interface ZeroizeResult {
  threadId: number;
}

/**
 * An audit key of an earlier master key, wrapped under the current one's KEK-wrapping key, so that
 * the log's older streams still verify after a master re-key. `id`: the key's fingerprint, which
 * the first line of each stream it signed carries (`ak`).
 */
export interface WrappedAuditKey {
  id: string;
  wrapped: Uint8Array;
}

/**
 * Master re-key, step one (src/kms/rekey.ts): every stored KEK version and every earlier audit key
 * rewrapped under the KEK-wrapping key of `newMasterKey`, plus this worker's own audit key, and
 * the new key check value. Nothing is stored here: the caller commits it in one transaction.
 */
export interface RekeyMasterTask {
  type: 'rekey-master';
  newMasterKey: MasterKeyRef;
  keks: KekRef[];
  auditKeys: WrappedAuditKey[];
  audit: AuditFields;
}

export interface RekeyMasterResult {
  keks: { version: number; wrapped: Uint8Array }[];
  kcv: Uint8Array;
  auditKeys: WrappedAuditKey[];
  auditHead?: StreamHead | undefined;
  auditCheckpoint?: NewKekResult['auditCheckpoint'];
}

/**
 * Whether `masterKey`, read on this host, is the key whose KEK-wrapping key has check value
 * `kcv`: a cluster replica's answer to another's re-key proposal (src/kms/cluster-rekey.ts), so
 * that it accepts the new key only when it can read that very key itself.
 */
export interface CheckMasterKeyTask {
  type: 'check-master-key';
  masterKey: MasterKeyRef;
  kcv: Uint8Array;
}

export interface CheckMasterKeyResult {
  matches: boolean;
}

export type WorkerTask =
  | BatchTask
  | NewKekTask
  | CheckKekTask
  | CheckMasterKeyTask
  | VerifyAuditTask
  | RekeyMasterTask
  | AuditCheckpointTask
  | ZeroizeTask;
