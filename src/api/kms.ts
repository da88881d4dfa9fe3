/**
 * The library API (`Kms`), implemented by the embedded KMS (`createKms`) and by the remote clients
 * (`createRemoteKms`), so callers cannot tell the modes apart. The operations the daemon serves
 * over HTTP and the bridge are declared one file each in src/ops/.
 */
import type { CodedError } from '../errors.js';

/** Who asked, for the audit log: a token name, a certificate subject, or 'embedded'. */
export interface CallContext {
  caller?: string;
  remoteAddress?: string;
}

/** A thread's DEK as the KMS describes it. `wrapped` is the current version, wrapped under a KEK. */
export interface DekInfo {
  keyId: string;
  threadId: string;
  kekId: string;
  kekVersion: number;
  /** Current DEK version; ciphertexts name the version they were made with. */
  keyVersion: number;
  wrapped: Buffer;
  createdAt: string;
}

export interface EncryptResult {
  ciphertext: Buffer;
  /** The DEK version the ciphertext was made with. */
  keyVersion: number;
}

export interface EncryptItem {
  keyId: string;
  plaintext: Uint8Array;
  aad?: Uint8Array | undefined;
}

export interface DecryptItem {
  keyId: string;
  ciphertext: Uint8Array;
  aad?: Uint8Array | undefined;
}

/** One item of a batch answer: its own result or its own error, in request order. */
export type ItemResult<T> = { ok: true; value: T } | { ok: false; error: CodedError };

export type RotationState = 'idle' | 'running' | 'completed';

export interface RotationStatus {
  state: RotationState;
  kekId: string;
  activeKekVersion: number;
  /** KEK version being rotated to (while running) or last rotated to. */
  targetKekVersion: number | null;
  /** DEK records examined so far and the total at the start of the pass. */
  done: number;
  total: number;
  startedAt: string | null;
  finishedAt: string | null;
  /** KEK versions still stored (the active one and any still referenced). */
  kekVersions: number[];
}

/**
 * The workers' key memory (embedded KMS): bytes of key slots locked in RAM (mlock) and bytes the
 * system refused to lock (RLIMIT_MEMLOCK), which stay guarded but may be swapped to disk.
 */
export interface KeyMemoryStatus {
  lockedBytes: number;
  unlockedBytes: number;
}

/** A replica of a KMS cluster (etcd registry): whether it may serve, and until when. */
export interface ReplicaStatus {
  replicaId: string;
  /** False once its etcd lease may have lapsed (or while it catches up): it refuses every call. */
  serving: boolean;
  /** Until when it may serve without another answer from etcd (ISO time). */
  servingUntil: string | null;
  leaseTtlSeconds: number;
  /** Why it is not serving, when it is not. */
  reason: string | null;
}

export interface KmsHealth {
  ok: boolean;
  mode: 'embedded' | 'external';
  kekId: string;
  activeKekVersion: number;
  dekCount: number;
  poolThreads: number;
  queueDepth: number;
  rotation: RotationStatus;
  /**
   * With a rotation period: when the active KEK version falls due (ISO time; null before the
   * first KEK). Absent without one, and over the TCP bridge.
   */
  nextRotationDueAt?: string | null;
  /** Present for a replica of a cluster. */
  replica?: ReplicaStatus;
  /** The workers' key memory, summed over the workers that reported it (not over the TCP bridge). */
  keyMemory?: KeyMemoryStatus;
}

export interface DestroyResult {
  keyId: string;
  /** DEK versions destroyed by this call (none when it only starts a deletion window). */
  destroyedVersions: number[];
  /**
   * destroyDek with a deletion window: when the key will be destroyed unless cancelDeletion is
   * called before (ISO time); null when nothing is pending (destroyed at once, or already gone).
   */
  deletionDueAt: string | null;
}

export interface Kms {
  /** Returns the thread's DEK, creating it on first call. Retries and races never make two. */
  createDekForThread(threadId: string, ctx?: CallContext): Promise<DekInfo>;
  getWrappedDek(keyId: string, ctx?: CallContext): Promise<DekInfo>;
  encrypt(keyId: string, plaintext: Uint8Array, aad?: Uint8Array, ctx?: CallContext): Promise<EncryptResult>;
  decrypt(keyId: string, ciphertext: Uint8Array, aad?: Uint8Array, ctx?: CallContext): Promise<Buffer>;
  encryptBatch(items: readonly EncryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]>;
  decryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<Buffer>[]>;
  /**
   * Decrypts with the DEK version named in the ciphertext and encrypts again under the key's
   * current version, inside one worker call: the plaintext never leaves the worker.
   */
  reencrypt(
    keyId: string,
    ciphertext: Uint8Array,
    aad?: Uint8Array,
    ctx?: CallContext,
  ): Promise<EncryptResult>;
  /** reencrypt for many ciphertexts, each answered with its own result or error, in order. */
  reencryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]>;
  /** Rewraps every stored version of one DEK under the active KEK. */
  rewrapDek(keyId: string, ctx?: CallContext): Promise<DekInfo>;
  /** Adds a new DEK version and makes it current; older versions still decrypt until destroyed. */
  rotateDek(keyId: string, ctx?: CallContext): Promise<DekInfo>;
  /** Destroys every DEK version older than `keepFromVersion` (after re-encryption finished). */
  destroyDekVersionsBefore(keyId: string, keepFromVersion: number, ctx?: CallContext): Promise<DestroyResult>;
  /**
   * Destroys the DEK and all its versions (crypto-shredding). Idempotent. With a deletion window
   * the key is disabled at once (every use refused with KEY_PENDING_DELETION) and destroyed when
   * the window ends (`deletionDueAt`), unless cancelDeletion is called first.
   */
  destroyDek(keyId: string, ctx?: CallContext): Promise<DestroyResult>;
  /**
   * Restores a key pending deletion, every version as it was. KEY_NOT_PENDING_DELETION for a key
   * that is not; KEY_NOT_FOUND once it has been destroyed.
   */
  cancelDeletion(keyId: string, ctx?: CallContext): Promise<DekInfo>;
  /** Starts (or joins, or resumes) a KEK rotation and resolves when it has finished. */
  rotateKek(ctx?: CallContext): Promise<RotationStatus>;
  /** Starts (or resumes) a KEK rotation in the background and returns its status at once. */
  startKekRotation(ctx?: CallContext): Promise<RotationStatus>;
  rotationStatus(): Promise<RotationStatus>;
  health(): Promise<KmsHealth>;
  close(): Promise<void>;
  /**
   * The embedded KMS only: opens its audit log anew (on SIGHUP, once logrotate renamed it).
   * Returns whether a new file was opened.
   */
  reopenAuditLog?(): boolean;
}

/** The outcome of verifying an audit log (`verifyAudit`, `progressdb-kms verify-audit`). */
export interface VerifyAuditResult {
  ok: boolean;
  linesVerified: number;
  /** 1-based line number of the first bad line in `file`, when !ok. */
  firstBadLine: number | null;
  /** The file holding the first bad line (a rolled file or the live one); null if none. */
  file: string | null;
  reason: string | null;
}
