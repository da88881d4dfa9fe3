/**
 * The KMS protocol, defined once and used two ways (the operations the daemon serves over HTTP
 * and the bridge are declared one file each in src/ops/):
 *  - the library API (`Kms`), implemented by the embedded KMS (`createKms`) and by the remote
 *    clients (`createRemoteKms`), so callers cannot tell the modes apart;
 *  - the worker task shapes that the main thread hands the crypto workers (wrapped keys,
 *    plaintext and ciphertext only; never an unwrapped key).
 */
import type { AuditHeadRecord, StreamHead } from './audit-link.js';
import type { CodedError, ErrorCode } from './errors.js';
import { CIPHERTEXT_HEADER_BYTES, CIPHERTEXT_OVERHEAD, NONCE_BYTES, WRAPPED_KEY_BYTES } from './format.js';

// ---------------------------------------------------------------------------------------------
// Library API
// ---------------------------------------------------------------------------------------------

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

export interface KmsHealth {
  ok: boolean;
  mode: 'embedded' | 'external';
  kekId: string;
  activeKekVersion: number;
  dekCount: number;
  poolThreads: number;
  queueDepth: number;
  rotation: RotationStatus;
}

export interface DestroyResult {
  keyId: string;
  /** DEK versions destroyed by this call. */
  destroyedVersions: number[];
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
  /** Destroys the DEK and all its versions (crypto-shredding). Idempotent. */
  destroyDek(keyId: string, ctx?: CallContext): Promise<DestroyResult>;
  /** Starts (or joins, or resumes) a KEK rotation and resolves when it has finished. */
  rotateKek(ctx?: CallContext): Promise<RotationStatus>;
  /** Starts (or resumes) a KEK rotation in the background and returns its status at once. */
  startKekRotation(ctx?: CallContext): Promise<RotationStatus>;
  rotationStatus(): Promise<RotationStatus>;
  health(): Promise<KmsHealth>;
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Worker tasks (main thread ⇄ crypto worker). Only wrapped keys, plaintext and ciphertext cross.
// ---------------------------------------------------------------------------------------------

/** How the worker finds the master key. The main thread only ever holds this reference. */
export type MasterKeyRef =
  /** `allowOpen`: accept a file that group or others can access (refused by default). */
  | { kind: 'file'; path: string; allowOpen?: boolean }
  | { kind: 'env'; name: string }
  /** Discouraged: hex in a config file (`master_key`); the worker reads the file itself. */
  | { kind: 'config'; path: string };

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

export interface WorkerInit {
  masterKey: MasterKeyRef;
  /** Max unwrapped DEK versions cached per worker (LRU, zeroed on eviction). */
  dekCacheSize: number;
  /** Name of the BroadcastChannel on which the main thread announces destroyed keys. */
  evictChannel: string;
  /**
   * The audit log each worker appends its signed blocks to (O_APPEND, one write per block, before
   * the task's results are released), or null when auditing is off.
   */
  auditFile: string | null;
  /** fdatasync after every block (auditFsyncMs = 0); otherwise the main thread fsyncs in groups. */
  auditFsyncEachWrite: boolean;
  /** Session link fields for the first line of this worker's stream (src/audit-link.ts), or null. */
  auditLink: string | null;
  /**
   * Shared with the main thread (layout: IdleSpinSlot): lets a worker that just finished a task spin
   * briefly for the next one instead of parking. Null disables spinning.
   */
  idleSpin: { signal: SharedArrayBuffer; budgetUs: number; cores: number } | null;
}

/**
 * Int32 slots of the idle-spin signal buffer. Waking a parked worker costs 15-70 µs on a VM (the
 * idle vCPU has to be woken by the hypervisor), several times the work of one small op.
 */
export const IdleSpinSlot = {
  /** threadId of the worker spinning now (at most one at a time), 0 if none. */
  spinner: 0,
  /** Workers running a task right now. */
  busy: 1,
  /** First of the per-worker counts of tasks posted, indexed by threadId % IDLE_SPIN_WORKER_SLOTS. */
  posted: 2,
} as const;
export const IDLE_SPIN_WORKER_SLOTS = 256;
export const IDLE_SPIN_SIGNAL_BYTES = 4 * (IdleSpinSlot.posted + IDLE_SPIN_WORKER_SLOTS);

/** Per-op kinds inside a batch task. */
export const OpKind = {
  encrypt: 1,
  decrypt: 2,
  reencrypt: 3,
  /** Generate a fresh DEK and wrap it (create, rotate_dek). */
  generate: 4,
  /** Unwrap a DEK and wrap it again under the target KEK. */
  rewrap: 5,
  /** No crypto; only an audit line (get_wrapped, destroy, failures found before dispatch). */
  note: 6,
} as const;
export type OpKindValue = (typeof OpKind)[keyof typeof OpKind];

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
 * Number of Int32 slots per op in `BatchTask.ops`:
 * [kind, dekIndex, dataOffset, dataLength, aadOffset, aadLength, auditIndex, errorIndex, outOffset]
 * dekIndex / auditIndex / errorIndex are -1 when absent. `errorIndex` points into `errors`: the op
 * failed before dispatch and the worker only audits it. `outOffset` is where the worker writes the
 * op's output in `data` itself (see opSlotBytes), so results travel back in the same buffer.
 */
export const OP_SLOTS = 9;

/**
 * Bytes an op occupies in `BatchTask.data` (before its AAD): its input plus room for its output,
 * which the worker writes in place from the slot's start. An encrypt's plaintext sits after
 * PLAINTEXT_LEAD bytes, leaving room for the ciphertext header and nonce.
 */
export function opSlotBytes(kind: number, inputLength: number): number {
  switch (kind) {
    case OpKind.encrypt:
      return inputLength + CIPHERTEXT_OVERHEAD;
    case OpKind.generate:
    case OpKind.rewrap:
      return WRAPPED_KEY_BYTES;
    default:
      return inputLength;
  }
}

/** Where an encrypt's plaintext starts inside its slot. */
export const PLAINTEXT_LEAD = CIPHERTEXT_HEADER_BYTES + NONCE_BYTES;

/** Bytes of output an op produces from an input of `inputLength` bytes. */
export function opOutputBytes(kind: number, inputLength: number): number {
  switch (kind) {
    case OpKind.encrypt:
      return inputLength + CIPHERTEXT_OVERHEAD;
    case OpKind.decrypt:
      return Math.max(0, inputLength - CIPHERTEXT_OVERHEAD);
    case OpKind.reencrypt:
      return inputLength;
    case OpKind.generate:
    case OpKind.rewrap:
      return WRAPPED_KEY_BYTES;
    default:
      return 0;
  }
}

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
  errors: ErrorCode[];
}

/**
 * Slots per op in `BatchResult.results`: [errorIndex, outOffset, outLength, keyVersion].
 * errorIndex -1 means success; otherwise it points into `errors`.
 */
export const RESULT_SLOTS = 4;

export interface BatchResult {
  results: Int32Array;
  /** The task's `data` buffer, sent back with every op's output written in place. */
  out: ArrayBuffer;
  errors: ErrorCode[];
  /** Whether this task appended audit lines (the main thread then schedules a group fsync). */
  audited: boolean;
  /** This worker's stream head after the task, when it appended lines (kept in the registry). */
  auditHead?: StreamHead | undefined;
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
  path: string;
  /** The registry's audit head, which the log's end must match (null: the registry records none). */
  head: AuditHeadRecord | null;
}

export interface VerifyAuditResult {
  ok: boolean;
  linesVerified: number;
  /** 1-based line number of the first bad line, when !ok. */
  firstBadLine: number | null;
  reason: string | null;
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

export type WorkerTask = BatchTask | NewKekTask | CheckKekTask | VerifyAuditTask | ZeroizeTask;
