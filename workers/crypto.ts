/**
 * The crypto worker: the only code that ever holds the master key, a KEK or an unwrapped DEK.
 *
 * The main thread sends batches of operations with wrapped keys, plaintext and ciphertext; the
 * worker resolves the master key itself (from the reference in workerData), unwraps KEKs and DEKs
 * into its keyring (locked memory, zeroed when dropped: keyring.ts), runs the batch, signs the batch's audit lines and
 * transfers the packed results back.
 */
import { timingSafeEqual } from 'node:crypto';
import { BroadcastChannel, threadId } from 'node:worker_threads';
import { move, transferableSymbol, valueSymbol, workerData } from 'piscina';
import {
  CIPHERS,
  ciphertextKeyVersion,
  dekIdentity,
  kekIdentity,
  WRAP_KIND_DEK,
  WRAP_KIND_KEK,
  wrappedKeyBytes,
} from '../src/format.js';
import {
  type AuditCheckpointResult,
  type AuditFields,
  type BatchResult,
  BatchResultWriter,
  type BatchTask,
  BatchTaskReader,
  type CheckKekResult,
  type CheckKekTask,
  type DekRef,
  type ErrorCode,
  type NewKekResult,
  type NewKekTask,
  OpKind,
  type RekeyMasterResult,
  type RekeyMasterTask,
  type TaskOutcome,
  type VerifyAuditResult,
  type VerifyAuditTask,
  type WorkerError,
  type WorkerInit,
  type WorkerTask,
  workerError,
  type ZeroizeResult,
} from '../src/worker-abi/index.js';
import {
  AuthFailure,
  openedPlaintextAt,
  openInto,
  openOp,
  randomKeyInto,
  sealInto,
  sealOp,
  wrapKeyInto,
} from './aead.js';
import { AuditLogFile } from './audit-log-file.js';
import { type AuditSigner, loadAuditSigner } from './audit-signer.js';
import { AuditStream, isoNow } from './audit-stream.js';
import { type AuditSite, AuditTally, isDataOp } from './audit-tally.js';
import { verifyAuditFiles } from './audit-verify-files.js';
import { faultOf, WorkerFault } from './fault.js';
import { IdleSpin } from './idle-spin.js';
import { KeyArena } from './key-arena.js';
import { KeyDirectoryEntries, type WorkerDirectoryEntry } from './key-directory-entries.js';
import { WorkerKeyring } from './keyring.js';
import type { RootKeys } from './master-key.js';
import { auditKeysById, checkMasterKey, keyCheckValueOf, rekeyMaster } from './rekey.js';

const init = workerData as WorkerInit;
/** The format new ciphertexts and wrapped keys are written in; both formats are read. */
const sealFormat = CIPHERS[init.cipher];
/** Every key this worker holds (see keyring.ts). */
const keyring = new WorkerKeyring(init.masterKey, init.dekCacheSize, init.masterKeySwitch);
let auditStream: AuditStream | null = null;
/** The key directory entries this worker has met, when the main thread names keys by entry. */
const directory = init.keyDirectory === null ? null : new KeyDirectoryEntries(init.keyDirectory);

function entryOf(index: number, generation: number): WorkerDirectoryEntry {
  if (directory === null)
    throw new WorkerFault('INTERNAL', 'an op names a key directory entry but there is none');
  return directory.entry(index, generation);
}
/** Data-op counts of the running task, with audit_data_ops: aggregate; null with `each`. */
const auditTally = init.auditDataOps === 'aggregate' ? new AuditTally() : null;

/** The audit signing key, loaded with the root keys when checkpoints are on. */
let auditSigner: AuditSigner | null = null;

function roots(): RootKeys {
  return keyring.roots((created) => {
    if (init.auditFile === null) return;
    const policy = init.auditCheckpoints;
    // A bad signing key fails the start-up check (check-kek), like a bad master key.
    auditSigner = policy === null ? null : loadAuditSigner(policy.signingKey);
    const checkpoints =
      policy === null || auditSigner === null
        ? null
        : { signer: auditSigner, lines: policy.lines, ms: policy.ms };
    auditStream = new AuditStream(created.auditKey, init.auditLink, init.auditReplica, checkpoints);
  });
}

/** The audit log this worker appends its blocks to (see audit-log-file.ts). */
const auditLog = new AuditLogFile(init.auditFile, init.auditGeneration, init.auditFsyncEachWrite);

function followAuditFile(): void {
  auditLog.follow(() => auditStream?.anchorNext());
}

/**
 * Seals and appends the open audit block, if any, with a checkpoint after it when one is due or
 * `checkpoint` asks for one. Returns whether anything was written.
 */
function flushAudit(checkpoint = false): boolean {
  const block = auditStream?.seal(checkpoint) ?? null;
  if (block === null) return false;
  auditLog.append(block);
  return true;
}

/** Zeroes every key this worker holds. */
function zeroAll(): void {
  keyring.zeroAll();
  auditSigner?.zero();
  auditSigner = null;
  auditStream = null;
  auditLog.close();
}

// The main thread announces destroyed keys here, so every worker drops them at once rather than
// waiting for LRU eviction.
const channel = new BroadcastChannel(init.evictChannel);
channel.onmessage = (event) => {
  const message = (event as MessageEvent).data as { type: 'evict'; keyId: string } | { type: 'zeroized' };
  if (message.type === 'evict') keyring.evict(message.keyId);
};
channel.unref();
channel.postMessage(keyring.memoryReport(threadId));

/** What one op's failure reports: a tag mismatch is the caller's tampered data or wrong key/AAD. */
function opErrorOf(err: unknown): WorkerError {
  if (err instanceof AuthFailure) return workerError('DECRYPT_FAILED');
  return faultOf(err) ?? workerError('INTERNAL');
}

/** Where in `batch.data` the output of the op runOp() last ran starts (it sets this). */
let opOutputAt = 0;

/**
 * Runs op `i` of a batch, writing its output over its own slot of `batch.data`; returns the
 * output's length, and leaves where it starts in opOutputAt (a format-2 decrypt leaves its
 * plaintext where it was opened, after the ciphertext's header and nonce).
 */
function runOp(batch: BatchTaskReader, i: number, dek: DekRef | WorkerDirectoryEntry | null): number {
  const task = batch.task;
  const kind = batch.kind(i);
  const aad = batch.aad(i);
  const out = batch.data;
  const outPos = batch.outputOffset(i);
  opOutputAt = outPos;
  if (kind === OpKind.note) return 0;
  // Every op but a note names its key (the pool lays out one per op).
  if (dek === null) throw new WorkerFault('INTERNAL', `op kind ${kind} without a key`);
  switch (kind) {
    case OpKind.encrypt:
      return sealOp(sealFormat, keyring.dek(dek, task), dek.keyVersion, out, outPos, batch, i, aad);
    case OpKind.decrypt:
      // The main thread chose `dek` by the version this ciphertext names.
      opOutputAt = openedPlaintextAt(out, outPos, batch, i);
      return openOp(keyring.dek(dek, task), out, outPos, batch, i, aad);
    case OpKind.reencrypt: {
      // `dek` is the current version; the source the one the ciphertext names.
      const input = batch.input(i);
      const source = batch.sourceDek(i);
      if (source === null) throw new WorkerFault('INTERNAL', 'reencrypt without its source key');
      if (ciphertextKeyVersion(input) !== source.keyVersion) throw new AuthFailure();
      const plain = reencryptScratch(input.length);
      try {
        const length = openInto(keyring.dek(source, task), input, aad, plain, 0);
        return sealInto(
          sealFormat,
          keyring.dek(dek, task),
          dek.keyVersion,
          plain.subarray(0, length),
          aad,
          out,
          outPos,
        );
      } finally {
        plain.fill(0);
      }
    }
    case OpKind.generate: {
      const kek = keyring.kek(task.targetKekVersion, task.keks);
      const identity = dekIdentity(dek.keyId, dek.keyVersion);
      const key = keyring.alloc();
      randomKeyInto(key);
      let length: number;
      try {
        length = wrapKeyInto(
          sealFormat,
          kek,
          WRAP_KIND_DEK,
          task.targetKekVersion,
          identity,
          key,
          out,
          outPos,
        );
      } catch (err) {
        keyring.free(key);
        throw err;
      }
      keyring.cacheDek(dek, key);
      return length;
    }
    case OpKind.rewrap: {
      const cached = keyring.cachedDek(dek);
      const key = cached ?? keyring.unwrapDek(dek, task);
      try {
        const kek = keyring.kek(task.targetKekVersion, task.keks);
        const identity = dekIdentity(dek.keyId, dek.keyVersion);
        return wrapKeyInto(sealFormat, kek, WRAP_KIND_DEK, task.targetKekVersion, identity, key, out, outPos);
      } finally {
        // Bulk rotation must not flood the cache: a key unwrapped only to rewrap is dropped.
        if (cached === undefined) keyring.free(key);
      }
    }
    default:
      throw new WorkerFault('UNSUPPORTED_OPERATION', `unknown op kind ${kind}`);
  }
}

/**
 * A reencrypt's plaintext passes through this buffer, reused (and zeroed after each op) rather
 * than allocated per op.
 */
let reencryptPlain = Buffer.alloc(0);

function reencryptScratch(bytes: number): Buffer {
  if (reencryptPlain.length < bytes)
    reencryptPlain = Buffer.alloc(Math.max(bytes, 2 * reencryptPlain.length));
  return reencryptPlain.subarray(0, bytes);
}

function runBatch(task: BatchTask): BatchResult {
  keyring.beginTask();
  try {
    return runBatchOps(task);
  } finally {
    keyring.endTask();
  }
}

function runBatchOps(task: BatchTask): BatchResult {
  const batch = new BatchTaskReader(task);
  const results = new BatchResultWriter(batch.count);
  // Notes need no key, but their audit lines need the audit key: a worker whose first task held
  // only notes (get_wrapped, say) would otherwise have had no stream to write them to.
  roots();
  followAuditFile();
  const ts = isoNow();
  // After a failed audit write nothing more is computed: no key use without its audit line.
  const refused =
    auditLog.failure === null
      ? null
      : workerError('AUDIT_WRITE_FAILED', `audit log unavailable (${auditLog.failure})`);
  let stopping = false;
  const callers = directory === null ? [] : directory.canonicalCallers(task.callers);

  for (let i = 0; i < batch.count; i++) {
    let dek: DekRef | WorkerDirectoryEntry | null = batch.dek(i);
    let audit = batch.audit(i);
    /** The op's audit site when its key is a directory entry (an encrypt or decrypt). */
    let site: AuditSite | null = null;
    const preError = batch.preError(i);
    let error: WorkerError | null = refused ?? (preError === null ? null : workerError(preError));
    const entryAt = batch.entryIndex(i);
    if (entryAt >= 0) {
      const caller = callers[batch.callerIndex(i)];
      try {
        const entry = entryOf(entryAt, batch.entryGeneration(i));
        dek = entry;
        if (caller !== undefined) {
          site = (directory as KeyDirectoryEntries).site(entry, caller);
          audit = site.fields;
        }
      } catch (err) {
        error ??= opErrorOf(err);
        // Still audited, by who asked, though the key it named is not known here.
        if (caller !== undefined) audit = { op: caller.op, caller: caller.caller, remote: caller.remote };
      }
    }
    let outputBytes = 0;
    if (error === null) {
      try {
        outputBytes = runOp(batch, i, dek);
      } catch (err) {
        error = opErrorOf(err);
        batch.clearOutput(i);
      }
    }
    if (error === null) results.ok(i, opOutputAt, outputBytes, dek?.keyVersion ?? 0);
    else results.fail(i, error);
    if (audit?.op === 'stop') stopping = true;
    if (audit !== null && auditStream !== null) {
      if (auditTally !== null && site !== null && error === null) auditTally.addOk(site);
      else if (auditTally !== null && isDataOp(audit)) auditTally.add(audit, error?.code ?? null);
      else auditStream.add(audit, ts, error === null ? 'ok' : 'error', error?.code ?? null);
    }
  }
  if (auditStream !== null) auditTally?.writeTo(auditStream, ts);

  let audited = false;
  if (refused === null) {
    try {
      // The stop line is checkpointed at once, so that a cut after it is seen without the MAC key.
      audited = flushAudit(stopping);
    } catch (err) {
      // The lines were not written, so none of this task's results may be released.
      batch.data.fill(0);
      results.failAll(opErrorOf(err));
    }
  }
  const auditHead = audited ? (auditStream?.head() ?? undefined) : undefined;
  const auditCheckpoint = audited ? (auditStream?.checkpoint() ?? undefined) : undefined;
  return results.finish(batch.data.buffer as ArrayBuffer, audited, auditHead, auditCheckpoint);
}

/** Checkpoints this worker's stream if some line is not yet covered (AuditCheckpointTask). */
function checkpointAudit(): AuditCheckpointResult {
  if (init.auditCheckpoints === null || init.auditFile === null) return { audited: false };
  roots();
  followAuditFile();
  if (auditLog.failure !== null || !flushAudit(true)) return { audited: false };
  return {
    audited: true,
    auditHead: auditStream?.head() ?? undefined,
    auditCheckpoint: auditStream?.checkpoint() ?? undefined,
  };
}

/** Audits a single non-batch task (start, new KEK) as a block of its own. */
function auditOne(fields: AuditFields, code: ErrorCode | null): void {
  if (auditStream === null) return;
  followAuditFile();
  auditStream.add(fields, isoNow(), code === null ? 'ok' : 'error', code);
  flushAudit();
}

function newKek(task: NewKekTask): NewKekResult {
  const { kekWrapKey } = roots();
  const key = keyring.alloc();
  randomKeyInto(key);
  const wrapped = Buffer.alloc(wrappedKeyBytes(sealFormat));
  try {
    wrapKeyInto(
      sealFormat,
      kekWrapKey,
      WRAP_KIND_KEK,
      0,
      kekIdentity(task.kekId, task.version),
      key,
      wrapped,
      0,
    );
    auditOne(task.audit, null);
  } catch (err) {
    keyring.free(key);
    throw err;
  }
  keyring.setKek(task.version, key, wrapped);
  return {
    wrapped,
    kcv: keyCheckValue(),
    auditHead: auditStream?.head() ?? undefined,
    auditCheckpoint: auditStream?.checkpoint() ?? undefined,
  };
}

function keyCheckValue(): Uint8Array {
  return keyCheckValueOf(roots().kekWrapKey);
}

function rekey(task: RekeyMasterTask): RekeyMasterResult {
  const result = rekeyMaster(task, keyring, sealFormat);
  // Signed under this stream's audit key, before the new wrapped keys leave the worker.
  auditOne(task.audit, null);
  return {
    ...result,
    auditHead: auditStream?.head() ?? undefined,
    auditCheckpoint: auditStream?.checkpoint() ?? undefined,
  };
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
      keyring.kek(kek.version, task.keks);
      proven = true;
    } catch (err) {
      if (faultOf(err)?.code !== 'MASTER_KEY_MISMATCH') throw err;
      if (!proven) return { ok: false, kcv: null };
      throw new WorkerFault(
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
  const arena = new KeyArena(task.auditKeys.length + 1);
  try {
    const keys = auditKeysById(keyring, task.auditKeys, arena);
    return verifyAuditFiles(keys, task.paths, task.head, task.trimmed);
  } finally {
    arena.zeroAll();
  }
}

const idleSpin = init.idleSpin === null ? null : new IdleSpin(init.idleSpin);

export default function handle(task: WorkerTask): unknown {
  if (idleSpin === null) return answer(task);
  idleSpin.taskStarted();
  try {
    return answer(task);
  } finally {
    idleSpin.taskEnded();
  }
}

/**
 * Runs a task and wraps its outcome. A reported failure returns as data; anything unexpected is
 * rethrown, so the main thread sees it as INTERNAL with its cause.
 */
function answer(task: WorkerTask): unknown {
  try {
    if (task.type !== 'batch') return { ok: true, value: runTask(task) } satisfies TaskOutcome<unknown>;
    const result = runBatch(task);
    const outcome: TaskOutcome<BatchResult> = { ok: true, value: result };
    // The bytes go back moved, not copied.
    return move({ [transferableSymbol]: BatchResultWriter.transferList(result), [valueSymbol]: outcome });
  } catch (err) {
    const error = faultOf(err);
    if (error === null) throw err;
    return { ok: false, error } satisfies TaskOutcome<unknown>;
  }
}

function runTask(task: Exclude<WorkerTask, BatchTask>): unknown {
  switch (task.type) {
    case 'new-kek':
      return newKek(task);
    case 'check-kek':
      return checkKek(task);
    case 'verify-audit':
      return verifyAudit(task);
    case 'rekey-master':
      return rekey(task);
    case 'check-master-key':
      return checkMasterKey(task);
    case 'audit-checkpoint':
      return checkpointAudit();
    case 'zeroize':
      return zeroize();
  }
}
