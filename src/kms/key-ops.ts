/**
 * The control plane of the embedded KMS: a thread's key (create or get), its wrapped form, and
 * its versions (rewrap under the active KEK, rotate, destroy some or all). Each change is one
 * registry transaction; key material is made and unwrapped only in the workers, and every call,
 * refused or not, writes its audit line.
 */
import { randomFillSync } from 'node:crypto';
import type { CallContext, DekInfo, DestroyResult } from '../api/index.js';
import { type CodedError, type ErrorCode, kmsError, toCodedError } from '../errors.js';
import { type AuditFields, type DekRef, OpKind } from '../worker-abi/index.js';
import {
  addVersion,
  applyVersionRewraps,
  cancelDestruction,
  checkKeepFromVersion,
  currentVersion,
  type DekRecord,
  dekRef,
  destroyAll,
  destroyIfDue,
  destroyVersionsBefore,
  nextVersion,
  pendingDeletionError,
  requireActive,
  scheduleDestruction,
} from './dek-versions.js';
import { auditFields, noteOp, type OpQueue, type QueuedOp } from './op-queue.js';
import type { DekNotStored, KekMeta, Registry } from './registry/index.js';
import { checkId, isValidId } from './validate-args.js';

/** A new key version made in a worker, wrapped under the template's KEK version. */
function generateOp(template: DekRef, audit: AuditFields): QueuedOp {
  return { ...noteOp(audit), kind: OpKind.generate, deks: [template] };
}

/** The audit note for a new thread's key that was made but not stored. */
const DISCARDED: Record<DekNotStored, string> = {
  'kek-retired': 'discarded: a KEK rotation retired its KEK version',
  'id-taken': 'discarded: its key id was taken',
};

/** Tries at making a new thread's key while rotations retire KEK versions under it. */
const CREATE_ATTEMPTS = 5;

export interface KeyOpsDeps {
  queue: OpQueue;
  registry: Registry;
  /** The active KEK as the registry holds it now. */
  kek(): KekMeta;
  assertOpen(): void;
  isClosed(): boolean;
  /** destroyDek's waiting period; 0 destroys at once. */
  deletionWindowMs: number;
  /** The clock of the deletion window (KmsClock.now). */
  now(): number;
}

/** Who the audit log names for a destruction at the end of a deletion window. */
export const DELETION_WINDOW_CALLER = 'kms-deletion-window';

/**
 * Key ids are `dek_` + 32 hex digits: the creation time in milliseconds (12 digits), then 80
 * random bits. Time first puts new records at the end of the registry's B-tree, so a commit of
 * many creates dirties a few pages at its right edge instead of one random leaf page per key
 * (random ids copied a 4 KiB page per create, LMDB's largest cost in a create). Ids are not secret
 * (audit lines name them) and reveal no more than the record's own created_at; they only need to
 * be unique: 80 random bits per millisecond, and the registry refuses a key id that exists.
 * The random bytes are drawn 256 ids at a time: one randomBytes call per id measured ~5% of the
 * main thread's time in a create.
 */
const ID_RANDOM_BYTES = 10;
const idPool = Buffer.alloc(ID_RANDOM_BYTES * 256);
let idPoolAt = idPool.length;

function newKeyId(): string {
  if (idPoolAt === idPool.length) {
    randomFillSync(idPool);
    idPoolAt = 0;
  }
  const time = Date.now().toString(16).padStart(12, '0');
  const id = `dek_${time}${idPool.toString('hex', idPoolAt, idPoolAt + ID_RANDOM_BYTES)}`;
  idPoolAt += ID_RANDOM_BYTES;
  return id;
}

export class KeyOps {
  readonly #creating = new Map<string, Promise<DekInfo>>();
  private readonly queue: OpQueue;
  private readonly registry: Registry;
  private readonly kek: () => KekMeta;
  private readonly assertOpen: () => void;
  private readonly isClosed: () => boolean;
  private readonly deletionWindowMs: number;
  private readonly now: () => number;

  constructor(deps: KeyOpsDeps) {
    this.deletionWindowMs = deps.deletionWindowMs;
    this.now = deps.now;
    this.queue = deps.queue;
    this.registry = deps.registry;
    this.kek = deps.kek;
    this.assertOpen = deps.assertOpen;
    this.isClosed = deps.isClosed;
  }

  /** A key's record, asking the registry's store when it is not known locally. */
  async #fetchRecord(keyId: string): Promise<DekRecord | undefined> {
    return this.registry.peekDek(keyId) ?? (await this.registry.dek(keyId));
  }

  #info(record: DekRecord): DekInfo {
    const current = currentVersion(record);
    return {
      keyId: record.keyId,
      threadId: record.threadId,
      kekId: this.kek().kekId,
      kekVersion: current.kek,
      keyVersion: record.current,
      wrapped: Buffer.from(current.wrapped),
      createdAt: record.createdAt,
    };
  }

  createDekForThread(threadId: string, ctx?: CallContext): Promise<DekInfo> {
    if (this.isClosed()) return Promise.reject(kmsError('NOT_READY', 'the KMS is closed'));
    let id: string;
    try {
      id = checkId('thread_id', threadId);
    } catch (err) {
      return this.#auditedFailure('create_dek_for_thread', ctx, err as CodedError);
    }
    const existingId = this.registry.peekKeyIdForThread(id);
    // A single node's store peeks its own file, so absent there is absent; a cluster replica's
    // cache may not know a key another replica made yet.
    if (existingId === undefined && this.registry.cluster !== undefined) {
      return this.registry.keyIdForThread(id).then((found) => this.#createOrGet(id, found, ctx));
    }
    return this.#createOrGet(id, existingId, ctx);
  }

  /** Returns the thread's active key (`existingId`) if it has one, else creates one. */
  async #createOrGet(
    id: string,
    existingId: string | undefined,
    ctx: CallContext | undefined,
  ): Promise<DekInfo> {
    const record = existingId === undefined ? undefined : await this.#fetchRecord(existingId);
    // The thread keeps a key pending deletion until it is destroyed: no second key meanwhile.
    if (record?.state === 'pending-deletion') {
      return this.#auditedFailure('create_dek_for_thread', ctx, pendingDeletionError(record), record.keyId);
    }
    const existing = record?.state === 'active' ? record : undefined;
    if (existing !== undefined) {
      const audit = auditFields(
        'create_dek_for_thread',
        ctx,
        existing.keyId,
        existing.threadId,
        existing.versions.at(-1)?.kek,
      );
      return this.queue.note({ ...audit, detail: 'existing' }).then(() => this.#info(existing));
    }
    // Concurrent calls for one thread share one creation; the registry transaction settles races
    // with other processes' callers.
    let pending = this.#creating.get(id);
    if (pending === undefined) {
      pending = this.#createDek(id, ctx).finally(() => this.#creating.delete(id));
      this.#creating.set(id, pending);
    }
    return pending;
  }

  /**
   * Generates and stores the thread's key. A KEK rotation can finish and retire the version a new
   * key was wrapped under before it is stored; then it is made again under the new active version
   * (with a fresh id, so no worker holds two keys under one identity).
   */
  async #createDek(threadId: string, ctx: CallContext | undefined): Promise<DekInfo> {
    for (let attempt = 1; ; attempt++) {
      const { keyId, stored } = await this.#createDekOnce(threadId, ctx);
      if (typeof stored !== 'string') return this.#info(stored);
      // Its creation was audited: say that the key was never stored, so the log stays exact.
      const audit = auditFields('create_dek_for_thread', ctx, keyId, threadId);
      await this.queue.note({ ...audit, detail: DISCARDED[stored] });
      if (attempt === CREATE_ATTEMPTS) {
        throw kmsError('CONFLICT', 'KEK rotations kept retiring the KEK version of the new key; try again');
      }
    }
  }

  async #createDekOnce(
    threadId: string,
    ctx: CallContext | undefined,
  ): Promise<{ keyId: string; stored: DekRecord | DekNotStored }> {
    const keyId = newKeyId();
    const kekVersion = this.kek().activeVersion;
    const template: DekRef = { keyId, keyVersion: 1, kekVersion, wrapped: new Uint8Array(0) };
    const audit = auditFields('create_dek_for_thread', ctx, keyId, threadId, kekVersion);
    const { output } = await this.queue.run(generateOp(template, audit));
    const now = new Date(this.now()).toISOString();
    const stored = await this.registry.createDek({
      keyId,
      threadId,
      createdAt: now,
      state: 'active',
      current: 1,
      versions: [{ v: 1, kek: kekVersion, wrapped: Buffer.from(output), createdAt: now }],
    });
    return { keyId, stored };
  }

  async getWrappedDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    this.assertOpen();
    const found = isValidId(keyId) ? await this.#fetchRecord(keyId) : undefined;
    if (found?.state === 'pending-deletion') return this.#refusePending('get_wrapped', ctx, found);
    const record = found?.state === 'active' ? found : undefined;
    const preError = this.#idError(keyId) ?? (record === undefined ? 'KEY_NOT_FOUND' : null);
    const audit = auditFields('get_wrapped', ctx, isValidId(keyId) ? keyId : undefined, record?.threadId);
    await this.queue.run(noteOp(audit, preError), this.#notFoundMessage(keyId));
    // A note with a pre-dispatch error always rejects, so here the record was found.
    return this.#info(record as DekRecord);
  }

  #idError(keyId: unknown): ErrorCode | null {
    return isValidId(keyId) ? null : 'INVALID_INPUT';
  }

  #notFoundMessage(keyId: unknown): string | undefined {
    return isValidId(keyId) ? `no key ${keyId}` : undefined;
  }

  #auditedFailure<T>(op: string, ctx: CallContext | undefined, err: CodedError, keyId?: string): Promise<T> {
    return this.queue.auditedFailure(auditFields(op, ctx, keyId), err);
  }

  /** Audits the refused use of a key pending deletion, then fails it with KEY_PENDING_DELETION. */
  #refusePending<T>(op: string, ctx: CallContext | undefined, record: DekRecord): Promise<T> {
    const audit = auditFields(op, ctx, record.keyId, record.threadId);
    return this.queue.auditedFailure(audit, pendingDeletionError(record));
  }

  async rewrapDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    this.assertOpen();
    const record = await this.#requireKey('rewrap', keyId, ctx);
    const target = this.kek().activeVersion;
    const rewrapped = await Promise.all(
      record.versions.map(async (version) => {
        // The version comes from the record itself.
        const ref = dekRef(record, version.v) as DekRef;
        const audit = {
          ...auditFields('rewrap', ctx, keyId, record.threadId, target),
          detail: `key version ${version.v}`,
        };
        const { output } = await this.queue.run({ ...noteOp(audit), kind: OpKind.rewrap, deks: [ref] });
        return { v: version.v, from: version.wrapped, to: Buffer.from(output), toKek: target };
      }),
    );
    const updated = await this.registry.updateDek(
      keyId,
      (current) => applyVersionRewraps(requireActive(current), rewrapped).record,
    );
    return this.#info(updated);
  }

  async rotateDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    this.assertOpen();
    const record = await this.#requireKey('rotate_dek', keyId, ctx);
    const version = nextVersion(record);
    const kekVersion = this.kek().activeVersion;
    const template: DekRef = { keyId, keyVersion: version, kekVersion, wrapped: new Uint8Array(0) };
    const audit = {
      ...auditFields('rotate_dek', ctx, keyId, record.threadId, kekVersion),
      detail: `new key version ${version}`,
    };
    const { output } = await this.queue.run(generateOp(template, audit));
    const now = new Date(this.now()).toISOString();
    const updated = await this.registry.updateDek(keyId, (current) =>
      addVersion(current, { v: version, kek: kekVersion, wrapped: Buffer.from(output), createdAt: now }),
    );
    return this.#info(updated);
  }

  async destroyDekVersionsBefore(
    keyId: string,
    keepFromVersion: number,
    ctx?: CallContext,
  ): Promise<DestroyResult> {
    this.assertOpen();
    try {
      checkKeepFromVersion(keepFromVersion);
    } catch (err) {
      return this.#auditedFailure(
        'destroy_dek_versions',
        ctx,
        err as CodedError,
        isValidId(keyId) ? keyId : undefined,
      );
    }
    await this.#requireKey('destroy_dek_versions', keyId, ctx);
    let destroyed: number[] = [];
    const updated = await this.registry.updateDek(keyId, (current) => {
      const result = destroyVersionsBefore(current, keepFromVersion);
      destroyed = result.destroyed;
      return result.record;
    });
    return this.#destroyed('destroy_dek_versions', ctx, updated, destroyed);
  }

  /**
   * Crypto-shreds the key: at once with no deletion window, else disables it now (every use
   * refused with KEY_PENDING_DELETION) and leaves its destruction to the deletion sweep.
   */
  async destroyDek(keyId: string, ctx?: CallContext): Promise<DestroyResult> {
    this.assertOpen();
    // Destroyed keys count as found here: destroying one again is a no-op, not an error.
    const record = this.#idError(keyId) === null ? await this.#fetchRecord(keyId) : undefined;
    if (record === undefined) await this.#rejectMissingKey('destroy_dek', keyId, ctx);
    if (this.deletionWindowMs > 0) return this.#scheduleDestruction(keyId, ctx);
    let destroyed: number[] = [];
    const updated = await this.registry.updateDek(keyId, (current) => {
      const result = destroyAll(current, new Date(this.now()).toISOString());
      destroyed = result.destroyed;
      return result.record;
    });
    return this.#destroyed('destroy_dek', ctx, updated, destroyed);
  }

  /** destroyDek within a deletion window; a key already pending keeps its due time. */
  async #scheduleDestruction(keyId: string, ctx: CallContext | undefined): Promise<DestroyResult> {
    const dueAt = new Date(this.now() + this.deletionWindowMs).toISOString();
    let scheduled = false;
    const updated = await this.registry.updateDek(keyId, (current) => {
      const next = scheduleDestruction(current, dueAt);
      scheduled = next !== current;
      return next;
    });
    const deletionDueAt = updated.deletionDueAt ?? null;
    const detail =
      updated.state === 'destroyed'
        ? 'destroyed []'
        : `${scheduled ? 'deletion scheduled' : 'already pending deletion'}: destroyed at ${deletionDueAt}`;
    await this.queue.note({ ...auditFields('destroy_dek', ctx, keyId, updated.threadId), detail });
    // The workers dropped the key with the commit (dropsKeyMaterial); in a cluster, answer once
    // no live replica still uses it either.
    await this.registry.confirmApplied();
    return { keyId, destroyedVersions: [], deletionDueAt };
  }

  /**
   * Makes a key pending deletion usable again; KEY_NOT_PENDING_DELETION for any other key, and
   * KEY_NOT_FOUND once it was destroyed (too late).
   */
  async cancelDeletion(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    this.assertOpen();
    const record = this.#idError(keyId) === null ? await this.#fetchRecord(keyId) : undefined;
    if (record === undefined) await this.#rejectMissingKey('cancel_deletion', keyId, ctx);
    let updated: DekRecord;
    try {
      updated = await this.registry.updateDek(keyId, (current) => cancelDestruction(current, this.now()));
    } catch (err) {
      return this.#auditedFailure('cancel_deletion', ctx, toCodedError(err), keyId);
    }
    // As for a destroy: when this answers, every live replica serves the key again (seen as a
    // replica that still refused it right after a cancel on another).
    await this.registry.confirmApplied();
    const audit = auditFields('cancel_deletion', ctx, keyId, updated.threadId, updated.versions.at(-1)?.kek);
    await this.queue.note({ ...audit, detail: `key version ${updated.current} usable again` });
    return this.#info(updated);
  }

  /**
   * The deletion sweep's destruction of one key whose window has ended (no change for a key
   * cancelled or destroyed meanwhile, by this process or another replica).
   */
  async destroyIfDue(keyId: string): Promise<number[]> {
    this.assertOpen();
    let destroyed: number[] = [];
    const updated = await this.registry.updateDek(keyId, (current) => {
      const result = destroyIfDue(current, this.now());
      destroyed = result.destroyed;
      return result.record;
    });
    if (destroyed.length > 0)
      await this.#destroyed('destroy_dek', { caller: DELETION_WINDOW_CALLER }, updated, destroyed);
    return destroyed;
  }

  /**
   * After a destroy commits, the audit line says which versions went. The workers have already
   * dropped them: the registry's change event for the commit evicts them (EmbeddedKms), for this
   * replica's destroys and other replicas' alike. In a cluster the call then waits until every
   * live replica has applied the commit (Registry.confirmApplied).
   */
  async #destroyed(
    op: string,
    ctx: CallContext | undefined,
    record: DekRecord,
    destroyed: number[],
  ): Promise<DestroyResult> {
    const audit = {
      ...auditFields(op, ctx, record.keyId, record.threadId),
      detail: `destroyed [${destroyed.join(',')}]`,
    };
    await this.queue.note(audit);
    // In a cluster, answer only once no live replica can still use what was destroyed.
    await this.registry.confirmApplied();
    return { keyId: record.keyId, destroyedVersions: destroyed, deletionDueAt: null };
  }

  /**
   * Resolves an active key or fails with an audited KEY_NOT_FOUND / INVALID_INPUT, or
   * KEY_PENDING_DELETION.
   */
  async #requireKey(op: string, keyId: unknown, ctx: CallContext | undefined): Promise<DekRecord> {
    const found = this.#idError(keyId) === null ? await this.#fetchRecord(keyId as string) : undefined;
    if (found?.state === 'pending-deletion') return this.#refusePending(op, ctx, found);
    return found?.state === 'active' ? found : this.#rejectMissingKey(op, keyId, ctx);
  }

  /** Audits a call that names no usable key (malformed or unknown id), then fails it. */
  #rejectMissingKey(op: string, keyId: unknown, ctx: CallContext | undefined): Promise<never> {
    const audit = auditFields(op, ctx, isValidId(keyId) ? keyId : undefined);
    const code = this.#idError(keyId) ?? 'KEY_NOT_FOUND';
    // A note op with a pre-dispatch error always rejects, after its audit line is written.
    return this.queue.run(noteOp(audit, code), this.#notFoundMessage(keyId)) as Promise<never>;
  }
}
