/**
 * The control plane of the embedded KMS: a thread's key (create or get), its wrapped form, and
 * its versions (rewrap under the active KEK, rotate, destroy some or all). Each change is one
 * registry transaction; key material is made and unwrapped only in the workers, and every call,
 * refused or not, writes its audit line.
 */
import { randomBytes } from 'node:crypto';
import type { CallContext, DekInfo, DestroyResult } from '../api/index.js';
import { type CodedError, type ErrorCode, kmsError } from '../errors.js';
import { type AuditFields, type DekRef, OpKind } from '../worker-abi/index.js';
import {
  addVersion,
  applyVersionRewraps,
  checkKeepFromVersion,
  currentVersion,
  type DekRecord,
  dekRef,
  destroyAll,
  destroyVersionsBefore,
  nextVersion,
  requireActive,
} from './dek-versions.js';
import { auditFields, noteOp, type OpQueue, type QueuedOp } from './op-queue.js';
import type { KekMeta, Registry } from './registry/index.js';
import { checkId, isValidId } from './validate-args.js';

/** A new key version made in a worker, wrapped under the template's KEK version. */
function generateOp(template: DekRef, audit: AuditFields): QueuedOp {
  return { ...noteOp(audit), kind: OpKind.generate, deks: [template] };
}

export interface KeyOpsDeps {
  queue: OpQueue;
  registry: Registry;
  /** The active KEK as the registry holds it now. */
  kek(): KekMeta;
  assertOpen(): void;
  isClosed(): boolean;
}

export class KeyOps {
  readonly #creating = new Map<string, Promise<DekInfo>>();
  private readonly queue: OpQueue;
  private readonly registry: Registry;
  private readonly kek: () => KekMeta;
  private readonly assertOpen: () => void;
  private readonly isClosed: () => boolean;

  constructor(deps: KeyOpsDeps) {
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
    if (existingId === undefined) {
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

  async #createDek(threadId: string, ctx: CallContext | undefined): Promise<DekInfo> {
    const keyId = `dek_${randomBytes(16).toString('hex')}`;
    const kekVersion = this.kek().activeVersion;
    const template: DekRef = { keyId, keyVersion: 1, kekVersion, wrapped: new Uint8Array(0) };
    const audit = auditFields('create_dek_for_thread', ctx, keyId, threadId, kekVersion);
    const { output } = await this.queue.run(generateOp(template, audit));
    const now = new Date().toISOString();
    const stored = await this.registry.createDek({
      keyId,
      threadId,
      createdAt: now,
      state: 'active',
      current: 1,
      versions: [{ v: 1, kek: kekVersion, wrapped: Buffer.from(output), createdAt: now }],
    });
    return this.#info(stored);
  }

  async getWrappedDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    this.assertOpen();
    const found = isValidId(keyId) ? await this.#fetchRecord(keyId) : undefined;
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
    const now = new Date().toISOString();
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

  async destroyDek(keyId: string, ctx?: CallContext): Promise<DestroyResult> {
    this.assertOpen();
    // Destroyed keys count as found here: destroying one again is a no-op, not an error.
    const record = this.#idError(keyId) === null ? await this.#fetchRecord(keyId) : undefined;
    if (record === undefined) await this.#rejectMissingKey('destroy_dek', keyId, ctx);
    let destroyed: number[] = [];
    const updated = await this.registry.updateDek(keyId, (current) => {
      const result = destroyAll(current, new Date().toISOString());
      destroyed = result.destroyed;
      return result.record;
    });
    return this.#destroyed('destroy_dek', ctx, updated, destroyed);
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
    return { keyId: record.keyId, destroyedVersions: destroyed };
  }

  /** Resolves an active key or fails with an audited KEY_NOT_FOUND / INVALID_INPUT. */
  async #requireKey(op: string, keyId: unknown, ctx: CallContext | undefined): Promise<DekRecord> {
    const found = this.#idError(keyId) === null ? await this.#fetchRecord(keyId as string) : undefined;
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
