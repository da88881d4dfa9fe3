/**
 * The layout of the Int32 arrays shared with the crypto workers, every slot a named constant. Only
 * the writers and readers in this directory index them (batch-task.ts, batch-result.ts).
 */
import {
  MAX_CIPHERTEXT_LEAD,
  MAX_CIPHERTEXT_OVERHEAD,
  MAX_WRAPPED_KEY_BYTES,
  MIN_CIPHERTEXT_OVERHEAD,
} from '../format.js';

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

// Int32 slots of one op in `BatchTask.ops` (op i starts at i * OP_SLOTS). Indexes are -1 when absent.
/** An OpKind value. */
export const kOpKind = 0;
/** Into `BatchTask.deks`; a reencrypt's source version follows its current one. */
export const kOpDekIndex = 1;
/** Byte offset and length of the op's input in `BatchTask.data`. */
export const kOpInputOffset = 2;
export const kOpInputLength = 3;
export const kOpAadOffset = 4;
export const kOpAadLength = 5;
/** Into `BatchTask.audit`. */
export const kOpAuditIndex = 6;
/** Into `BatchTask.errors`: the op failed before dispatch and the worker only audits it. */
export const kOpErrorIndex = 7;
/**
 * Where the worker writes the op's output in `data` itself (see opSlotBytes), so results travel
 * back in the same buffer.
 */
export const kOpOutputOffset = 8;
/**
 * The op's DEK version as a key directory entry (key-directory.ts), index and generation, in place
 * of kOpDekIndex; -1 when it carries a DekRef.
 */
export const kOpEntryIndex = 9;
export const kOpEntryGeneration = 10;
/**
 * Into `BatchTask.callers`, in place of kOpAuditIndex: the op's audit fields are its entry's key
 * fields with this op name and caller.
 */
export const kOpCallerIndex = 11;
export const OP_SLOTS = 12;

/**
 * Bytes an op occupies in `BatchTask.data` (before its AAD): its input plus room for its output,
 * which the worker writes in place from the slot's start. The main thread lays tasks out without
 * knowing which format the worker seals in, so the room is the larger format's: an encrypt's
 * plaintext sits after MAX_CIPHERTEXT_LEAD bytes (room for any header and nonce), and a reencrypt
 * may move a ciphertext from the smaller format to the larger.
 */
export function opSlotBytes(kind: number, inputLength: number): number {
  switch (kind) {
    case OpKind.encrypt:
      return inputLength + MAX_CIPHERTEXT_OVERHEAD;
    case OpKind.reencrypt:
      return inputLength + MAX_CIPHERTEXT_OVERHEAD - MIN_CIPHERTEXT_OVERHEAD;
    case OpKind.generate:
    case OpKind.rewrap:
      return MAX_WRAPPED_KEY_BYTES;
    default:
      return inputLength;
  }
}

/** Where an encrypt's plaintext starts inside its slot. */
export const PLAINTEXT_LEAD = MAX_CIPHERTEXT_LEAD;

// Int32 slots of one op's answer in `BatchResult.results` (op i starts at i * RESULT_SLOTS).
/** -1 on success; otherwise an index into `BatchResult.errors`. */
export const kResultErrorIndex = 0;
/** Byte offset and length of the op's output in `BatchResult.out`. */
export const kResultOutputOffset = 1;
export const kResultOutputLength = 2;
/** The DEK version the op used (0 on failure). */
export const kResultKeyVersion = 3;
export const RESULT_SLOTS = 4;
