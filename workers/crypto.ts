/**
 * The crypto worker: the only code that ever holds the master key, a KEK or an unwrapped DEK.
 *
 * The main thread sends batches of operations with wrapped keys, plaintext and ciphertext; the
 * worker resolves the master key itself (from the reference in workerData), unwraps KEKs and DEKs
 * into bounded caches (zeroed when dropped), runs the batch, signs the batch's audit lines and
 * transfers the packed results back.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import { BroadcastChannel, threadId } from 'node:worker_threads';
import { move, transferableSymbol, valueSymbol, workerData } from 'piscina';
import type { ErrorCode } from '../src/errors.js';
import {
  CIPHERTEXT_OVERHEAD,
  ciphertextKeyVersion,
  dekIdentity,
  kekIdentity,
  WRAP_KIND_DEK,
  WRAP_KIND_KEK,
  WRAPPED_KEY_BYTES,
} from '../src/format.js';
import {
  type AuditFields,
  type BatchResult,
  type BatchTask,
  type CheckKekResult,
  type CheckKekTask,
  type DekRef,
  type KekRef,
  type NewKekResult,
  type NewKekTask,
  OP_SLOTS,
  OpKind,
  opOutputBytes,
  opSlotBytes,
  RESULT_SLOTS,
  type VerifyAuditResult,
  type VerifyAuditTask,
  type WorkerInit,
  type WorkerTask,
  type ZeroizeResult,
} from '../src/protocol.js';
import { AuthFailure, newKey, openInto, sealInto, unwrapKey, wrapKeyInto } from './aead.js';
import { AuditStream, type SealedBlock, verifyAuditFile } from './audit-stream.js';
import { IdleSpin } from './idle-spin.js';
import { KeyCache } from './key-cache.js';
import { coded, loadRootKeys, type RootKeys } from './master-key.js';

const init = workerData as WorkerInit;

let rootKeys: RootKeys | null = null;
let auditStream: AuditStream | null = null;
const keks = new Map<number, Buffer>();
const deks = new KeyCache(init.dekCacheSize);

function roots(): RootKeys {
  if (rootKeys === null) {
    rootKeys = loadRootKeys(init.masterKey);
    if (init.auditFile !== null) auditStream = new AuditStream(rootKeys.auditKey, init.auditLink);
  }
  return rootKeys;
}

let auditFd = -1;
/** Set once an audit write failed: from then on this worker refuses every op (fail closed). */
let auditFailure: string | null = null;

/**
 * Appends a signed block to the audit log before the task's results are released. O_APPEND and one
 * write per block keep blocks whole when several workers append; each worker's own stream stays in
 * order because a worker runs one task at a time.
 */
function appendAudit(block: SealedBlock): void {
  if (auditFailure !== null) throw coded('AUDIT_WRITE_FAILED', `audit log unavailable (${auditFailure})`);
  try {
    if (auditFd < 0) auditFd = fs.openSync(init.auditFile!, 'a', 0o600);
    let written = 0;
    while (written < block.length) {
      written += fs.writeSync(auditFd, block.buffer, written, block.length - written);
    }
    if (init.auditFsyncEachWrite) fs.fdatasyncSync(auditFd);
  } catch (err) {
    auditFailure = (err as NodeJS.ErrnoException).code ?? 'write error';
    throw coded('AUDIT_WRITE_FAILED', `audit log write failed (${auditFailure}); operation refused`);
  }
}

/** Seals and appends the open audit block, if any. Returns whether anything was written. */
function flushAudit(): boolean {
  const block = auditStream?.seal() ?? null;
  if (block === null) return false;
  appendAudit(block);
  return true;
}

/** Zeroes every key this worker holds. */
function zeroAll(): void {
  deks.clear();
  for (const key of keks.values()) key.fill(0);
  keks.clear();
  if (rootKeys !== null) {
    rootKeys.kekWrapKey.fill(0);
    rootKeys.auditKey.fill(0);
    rootKeys = null;
  }
  auditStream = null;
  if (auditFd >= 0) {
    fs.closeSync(auditFd);
    auditFd = -1;
  }
}

// The main thread announces destroyed keys here, so every worker drops them at once rather than
// waiting for LRU eviction.
const channel = new BroadcastChannel(init.evictChannel);
channel.onmessage = (event) => {
  const message = (event as MessageEvent).data as { type: 'evict'; keyId: string } | { type: 'zeroized' };
  if (message.type === 'evict') deks.deletePrefix(`${message.keyId}#`);
};
channel.unref();

function kekFor(version: number, refs: readonly KekRef[]): Buffer {
  const cached = keks.get(version);
  if (cached !== undefined) return cached;
  const ref = refs.find((k) => k.version === version);
  // The main thread supplies every KEK version the registry holds for the task's keys.
  if (ref === undefined) throw coded('STORE_CORRUPT', `KEK version ${version} is missing from the registry`);
  let key: Buffer;
  try {
    key = unwrapKey(roots().kekWrapKey, WRAP_KIND_KEK, 0, kekIdentity(ref.kekId, ref.version), ref.wrapped);
  } catch (err) {
    if (err instanceof AuthFailure) {
      throw coded('MASTER_KEY_MISMATCH', 'the master key cannot unwrap the stored KEK: wrong master key');
    }
    throw err;
  }
  keks.set(version, key);
  return key;
}

function dekCacheId(dek: DekRef): string {
  return `${dek.keyId}#${dek.keyVersion}`;
}

/** Unwraps (or finds cached) a DEK version. Cached keys belong to the cache: never zero them here. */
function dekFor(dek: DekRef, task: BatchTask): Buffer {
  const resolved = taskKeys.get(dek);
  if (resolved !== undefined) return resolved;
  const key = lookupDek(dek, task);
  taskKeys.set(dek, key);
  return key;
}

/**
 * Keys resolved during the current task, by DekRef object: a batch of 64 ops on one key does one
 * cache lookup, not 64. Cleared at the end of every task (the cache owns the buffers).
 */
const taskKeys = new Map<DekRef, Buffer>();

function lookupDek(dek: DekRef, task: BatchTask): Buffer {
  const id = dekCacheId(dek);
  const cached = deks.get(id);
  if (cached !== undefined) return cached;
  const kek = kekFor(dek.kekVersion, task.keks);
  let key: Buffer;
  try {
    key = unwrapKey(kek, WRAP_KIND_DEK, dek.kekVersion, dekIdentity(dek.keyId, dek.keyVersion), dek.wrapped);
  } catch (err) {
    // A stored wrapped DEK that fails authentication is corrupt (or was swapped): never a user error.
    if (err instanceof AuthFailure) throw coded('STORE_CORRUPT', `wrapped DEK ${dek.keyId} failed to unwrap`);
    throw err;
  }
  deks.set(id, key);
  return key;
}

function codeOf(err: unknown): ErrorCode {
  if (err instanceof AuthFailure) return 'DECRYPT_FAILED';
  const match = err instanceof Error ? /^\[([A-Z_]+)\]/.exec(err.message) : null;
  return (match?.[1] as ErrorCode | undefined) ?? 'INTERNAL';
}

let isoMillis = 0;
let isoText = '';
/** The current time as ISO 8601, formatted at most once per millisecond. */
function isoNow(): string {
  const now = Date.now();
  if (now !== isoMillis) {
    isoMillis = now;
    isoText = new Date(now).toISOString();
  }
  return isoText;
}

function runBatch(task: BatchTask): BatchResult {
  const ops = task.ops;
  const count = ops.length / OP_SLOTS;
  // Outputs are written in place, each over its op's own slot of the buffer that brought the input,
  // and that buffer goes back: one allocation per task, made (and zeroed) by the main thread.
  const out = Buffer.from(task.data);
  const results = new Int32Array(count * RESULT_SLOTS);
  const errors: ErrorCode[] = [];
  const errorIndex = (code: ErrorCode): number => {
    const at = errors.indexOf(code);
    return at >= 0 ? at : errors.push(code) - 1;
  };
  // Notes need no key, but their audit lines need the audit key: a worker whose first task held
  // only notes (get_wrapped, say) would otherwise have had no stream to write them to.
  roots();
  const ts = isoNow();
  // After a failed audit write nothing more is computed: no key use without its audit line.
  const refused: ErrorCode | null = auditFailure === null ? null : 'AUDIT_WRITE_FAILED';

  for (let i = 0; i < count; i++) {
    const base = i * OP_SLOTS;
    const kind = ops[base]!;
    const dek = ops[base + 1]! >= 0 ? task.deks[ops[base + 1]!]! : null;
    const input = out.subarray(ops[base + 2]!, ops[base + 2]! + ops[base + 3]!);
    const aad = ops[base + 5]! > 0 ? out.subarray(ops[base + 4]!, ops[base + 4]! + ops[base + 5]!) : null;
    const preError = ops[base + 7]!;
    const outPos = ops[base + 8]!;
    const size = opOutputBytes(kind, input.length);
    let code: ErrorCode | null = refused ?? (preError >= 0 ? task.errors[preError]! : null);
    let keyVersion = dek?.keyVersion ?? 0;
    if (code === null) {
      try {
        switch (kind) {
          case OpKind.encrypt:
            sealInto(dekFor(dek!, task), dek!.keyVersion, input, aad, out, outPos);
            break;
          case OpKind.decrypt:
            // The main thread chose `dek` by the version this ciphertext names.
            openInto(dekFor(dek!, task), input, aad, out, outPos);
            break;
          case OpKind.reencrypt: {
            // deks[dekIndex] is the current version; deks[dekIndex + 1] the one the ciphertext names.
            const source = task.deks[ops[base + 1]! + 1]!;
            if (ciphertextKeyVersion(input) !== source.keyVersion) throw new AuthFailure();
            const plain = Buffer.alloc(input.length - CIPHERTEXT_OVERHEAD);
            try {
              openInto(dekFor(source, task), input, aad, plain, 0);
              sealInto(dekFor(dek!, task), dek!.keyVersion, plain, aad, out, outPos);
            } finally {
              plain.fill(0);
            }
            break;
          }
          case OpKind.generate: {
            const key = newKey();
            const kek = kekFor(task.targetKekVersion, task.keks);
            const identity = dekIdentity(dek!.keyId, dek!.keyVersion);
            wrapKeyInto(kek, WRAP_KIND_DEK, task.targetKekVersion, identity, key, out, outPos);
            deks.set(dekCacheId(dek!), key);
            break;
          }
          case OpKind.rewrap: {
            const cached = deks.get(dekCacheId(dek!));
            const key = cached ?? unwrapForRewrap(dek!, task);
            try {
              const kek = kekFor(task.targetKekVersion, task.keks);
              const identity = dekIdentity(dek!.keyId, dek!.keyVersion);
              wrapKeyInto(kek, WRAP_KIND_DEK, task.targetKekVersion, identity, key, out, outPos);
            } finally {
              // Bulk rotation must not flood the cache: a key unwrapped only to rewrap is dropped.
              if (cached === undefined) key.fill(0);
            }
            break;
          }
          case OpKind.note:
            break;
          default:
            throw coded('UNSUPPORTED_OPERATION', `unknown op kind ${kind}`);
        }
      } catch (err) {
        code = codeOf(err);
        keyVersion = 0;
        out.fill(0, outPos, outPos + opSlotBytes(kind, input.length));
      }
    }
    const r = i * RESULT_SLOTS;
    if (code === null) {
      results[r] = -1;
      results[r + 1] = outPos;
      results[r + 2] = size;
    } else {
      results[r] = errorIndex(code);
      results[r + 1] = 0;
      results[r + 2] = 0;
    }
    results[r + 3] = keyVersion;
    const auditAt = ops[base + 6]!;
    if (auditAt >= 0 && auditStream !== null) {
      auditStream.add(task.audit[auditAt]!, ts, code === null ? 'ok' : 'error', code);
    }
  }

  taskKeys.clear();
  let audited = false;
  if (refused === null) {
    try {
      audited = flushAudit();
    } catch (err) {
      // The lines were not written, so none of this task's results may be released.
      out.fill(0);
      results.fill(0);
      const at = errorIndex(codeOf(err));
      for (let i = 0; i < count; i++) results[i * RESULT_SLOTS] = at;
    }
  }
  const auditHead = audited ? (auditStream?.head() ?? undefined) : undefined;
  const result: BatchResult = { results, out: out.buffer as ArrayBuffer, errors, audited, auditHead };
  const transfer: ArrayBuffer[] = [results.buffer as ArrayBuffer, out.buffer as ArrayBuffer];
  return move({ [transferableSymbol]: transfer, [valueSymbol]: result }) as unknown as BatchResult;
}

function unwrapForRewrap(dek: DekRef, task: BatchTask): Buffer {
  const kek = kekFor(dek.kekVersion, task.keks);
  try {
    return unwrapKey(kek, WRAP_KIND_DEK, dek.kekVersion, dekIdentity(dek.keyId, dek.keyVersion), dek.wrapped);
  } catch (err) {
    if (err instanceof AuthFailure) throw coded('STORE_CORRUPT', `wrapped DEK ${dek.keyId} failed to unwrap`);
    throw err;
  }
}

/** Audits a single non-batch task (start, new KEK) as a block of its own. */
function auditOne(fields: AuditFields, code: ErrorCode | null): void {
  if (auditStream === null) return;
  auditStream.add(fields, isoNow(), code === null ? 'ok' : 'error', code);
  flushAudit();
}

function newKek(task: NewKekTask): NewKekResult {
  const { kekWrapKey } = roots();
  const key = newKey();
  const wrapped = Buffer.alloc(WRAPPED_KEY_BYTES);
  wrapKeyInto(kekWrapKey, WRAP_KIND_KEK, 0, kekIdentity(task.kekId, task.version), key, wrapped, 0);
  auditOne(task.audit, null);
  keks.set(task.version, key);
  return { wrapped, kcv: keyCheckValue(), auditHead: auditStream?.head() ?? undefined };
}

const KCV_LABEL = 'progressdb/kek-wrap-check/v1';
const KCV_BYTES = 16;

/**
 * Not secret: a truncated HMAC under the KEK-wrapping key proves which key it is, revealing nothing.
 * A copy of its own: a view would take its whole backing buffer along when cloned to the main thread.
 */
function keyCheckValue(): Uint8Array {
  return new Uint8Array(
    createHmac('sha256', roots().kekWrapKey).update(KCV_LABEL).digest().subarray(0, KCV_BYTES),
  );
}

// Nothing is written on a mismatch: a line signed with an audit key derived from the wrong master
// key would break the verification of the data directory's log (and the directory must stay
// untouched).
function checkKek(task: CheckKekTask): CheckKekResult {
  const kcv = keyCheckValue();
  if (task.kcv !== null && (task.kcv.length !== kcv.length || !timingSafeEqual(task.kcv, kcv))) {
    return { ok: false, kcv: null };
  }
  // Without a stored KCV the first unwrap is all there is to go on: if it fails, most likely the
  // key is wrong; once one KEK unwrapped, the key is right and a failure is corruption.
  let proven = task.kcv !== null;
  for (const kek of task.keks) {
    try {
      kekFor(kek.version, task.keks);
      proven = true;
    } catch (err) {
      if (codeOf(err) !== 'MASTER_KEY_MISMATCH') throw err;
      if (!proven) return { ok: false, kcv: null };
      throw coded(
        'STORE_CORRUPT',
        `stored KEK version ${kek.version} fails to unwrap although the master key matches this ` +
          'data directory (its key check value): the registry is corrupt',
      );
    }
  }
  return { ok: true, kcv };
}

function zeroize(): ZeroizeResult {
  zeroAll();
  // Announced on the channel too, so that anyone watching (tests) sees each worker confirm it.
  channel.postMessage({ type: 'zeroized', threadId });
  return { threadId };
}

function verifyAudit(task: VerifyAuditTask): VerifyAuditResult {
  return verifyAuditFile(roots().auditKey, task.path, task.head);
}

const idleSpin = init.idleSpin === null ? null : new IdleSpin(init.idleSpin);

export default function handle(task: WorkerTask): unknown {
  if (idleSpin === null) return runTask(task);
  idleSpin.taskStarted();
  try {
    return runTask(task);
  } finally {
    idleSpin.taskEnded();
  }
}

function runTask(task: WorkerTask): unknown {
  switch (task.type) {
    case 'batch':
      return runBatch(task);
    case 'new-kek':
      return newKek(task);
    case 'check-kek':
      return checkKek(task);
    case 'verify-audit':
      return verifyAudit(task);
    case 'zeroize':
      return zeroize();
  }
}
