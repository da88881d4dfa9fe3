/**
 * The embedded KMS: createKms() opens the registry and audit log, starts the crypto workers,
 * checks the master key against the stored KEK, and serves the Kms interface.
 *
 * This is main-thread code: it handles wrapped keys, plaintext and ciphertext, never a raw key.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type {
  CallContext,
  DecryptItem,
  DekInfo,
  DestroyResult,
  EncryptItem,
  EncryptResult,
  ItemResult,
  Kms,
  KmsHealth,
  RotationStatus,
  VerifyAuditResult,
} from '../api/index.js';
import { type KmsOptions, type ResolvedKmsOptions, resolveKmsOptions } from '../config/library.js';
import { type CodedError, type ErrorCode, kmsError, toCodedError } from '../errors.js';
import { CIPHERTEXT_OVERHEAD } from '../format.js';
import { type Logger, silentLogger } from '../log.js';
import {
  type AuditFields,
  type CheckKekResult,
  type DekRef,
  type KekRef,
  type NewKekResult,
  type NewKekTask,
  OpKind,
  type OpKindValue,
} from '../worker-abi/index.js';
import { AUDIT_FILE_NAME, AuditFile } from './audit-file.js';
import { AuditHeadKeeper } from './audit-head-keeper.js';
import {
  addVersion,
  applyVersionRewraps,
  checkKeepFromVersion,
  currentVersion,
  type DekRecord,
  dataOpRefs,
  dekRef,
  destroyAll,
  destroyVersionsBefore,
  dropsKeyMaterial,
  nextVersion,
  requireActive,
} from './dek-versions.js';
import { type DirLock, lockDataDir } from './dir-lock.js';
import { CryptoPool, type PendingOp } from './pool.js';
import type { KekMeta, Registry } from './registry/index.js';
import { openRegistry } from './registry/open.js';
import { KekRotation } from './rotation.js';
import { checkAad, checkBytes, checkId, isValidId, MAX_PLAINTEXT_BYTES } from './validate-args.js';

export type { KmsOptions } from '../config/library.js';
export { AUDIT_FILE_NAME } from './audit-file.js';
export { MAX_AAD_BYTES, MAX_PLAINTEXT_BYTES } from './validate-args.js';

interface OpOutput {
  output: Buffer;
  keyVersion: number;
}

interface AuditSlot {
  op: string;
  caller: string | undefined;
  remote: string | undefined;
  kekVersion: number;
  fields: AuditFields;
}

const AUDIT_SLOTS_PER_RECORD = 8;

/** An op checked and resolved against the registry, ready to queue. */
interface PreparedOp {
  kind: OpKindValue;
  deks: DekRef[];
  input: Uint8Array | null;
  aad: Uint8Array | null;
  audit: AuditFields;
  preError: ErrorCode | null;
  message: string | undefined;
  /** A key id the registry did not know locally: fetch it, then prepare the op again. */
  unknownKey: string | undefined;
}

/** A worker sends codes only; a corrupt record is named (by key id, never its bytes) for the operator. */
function opErrorMessage(p: PreparedOp, code: ErrorCode): string | undefined {
  if (code === p.preError) return p.message;
  const keyId = p.deks[0]?.keyId;
  if (code === 'STORE_CORRUPT' && keyId !== undefined) {
    return `the stored record of key ${keyId} is corrupt (its wrapped key or the KEK version it names)`;
  }
  return undefined;
}

class EmbeddedKms implements Kms {
  readonly #opts: ResolvedKmsOptions;
  readonly #log: Logger;
  readonly #registry: Registry;
  readonly #pool: CryptoPool;
  readonly #auditFile: AuditFile | null;
  /** Links this session's audit streams to the last one (null with audit off). */
  readonly #auditHeads: AuditHeadKeeper | null;
  readonly #lock: DirLock;
  readonly #kekRefs = new Map<number, KekRef>();
  readonly #creating = new Map<string, Promise<DekInfo>>();
  readonly #auditCache = new WeakMap<DekRecord, AuditSlot[]>();
  #kek: KekMeta = { kekId: '', activeVersion: 0, createdAt: '' };
  #rotation!: KekRotation;
  #closed = false;
  #closing: Promise<void> | null = null;

  constructor(
    opts: ResolvedKmsOptions,
    log: Logger,
    registry: Registry,
    auditFile: AuditFile | null,
    lock: DirLock,
  ) {
    this.#opts = opts;
    this.#log = log;
    this.#registry = registry;
    this.#auditFile = auditFile;
    this.#lock = lock;
    const auditHeads = auditFile === null ? null : new AuditHeadKeeper(registry, log);
    this.#auditHeads = auditHeads;
    if (auditHeads !== null) auditFile?.onFlush(auditHeads.beforeFlush);
    this.#pool = new CryptoPool({
      threads: opts.poolSize,
      maxBatch: opts.maxBatch,
      idleSpinUs: opts.idleSpinUs,
      init: {
        masterKey: opts.masterKey,
        dekCacheSize: opts.dekCacheSize,
        evictChannel: `progressdb-kms-${process.pid}-${randomBytes(6).toString('hex')}`,
        auditFile: auditFile === null ? null : auditFile.path,
        auditFsyncEachWrite: opts.auditFsyncMs === 0,
        auditLink: auditHeads?.linkFields ?? null,
      },
      kekRef: (version) => this.#kekRef(version),
      onAudit: (failed, head) => {
        if (failed) {
          this.#auditFile?.fail('a worker could not append to the audit log');
          return;
        }
        this.#auditHeads?.report(head);
        this.#auditFile?.markDirty();
      },
      activeKekVersion: () => this.#kek.activeVersion,
    });
    // Keys destroyed by another replica of a cluster leave this replica's workers too.
    registry.onDekChange((keyId, record) => {
      if (dropsKeyMaterial(record)) this.#pool.evict(keyId);
    });
  }

  /**
   * Cuts the unfinished block a crash (kill -9 during a worker's write) can leave at the end of
   * the audit log, so that new blocks follow the last complete one and the log verifies. None of
   * that block's results was released. Returns the bytes dropped.
   */
  #repairAuditLog(): number {
    const dropped = this.#auditFile?.repairTornTail() ?? 0;
    if (dropped > 0) {
      this.#log.warn(
        `audit log: dropped ${dropped} bytes of an unfinished block left by a crash (no result of it was released)`,
      );
    }
    return dropped;
  }

  /** First start creates KEK version 1; later starts prove the master key unwraps the active KEK. */
  async start(): Promise<void> {
    const existing = this.#registry.kekMeta();
    if (existing === undefined) {
      this.#repairAuditLog();
      this.#auditHeads?.begin();
      const kekId = `kek_${randomBytes(8).toString('hex')}`;
      const created = await this.#newKek({
        type: 'new-kek',
        kekId,
        version: 1,
        audit: { op: 'start', kekVersion: 1, detail: 'new data directory: created KEK version 1' },
      });
      const now = new Date().toISOString();
      const meta: KekMeta = { kekId, activeVersion: 1, createdAt: now };
      await this.#registry.initKek(
        meta,
        {
          kekId,
          version: 1,
          wrapped: created.wrapped,
          createdAt: now,
          refs: 0,
        },
        created.kcv,
      );
    }
    this.#kek = this.#registry.kekMeta()!;
    const active = this.#kekRef(this.#kek.activeVersion);
    if (active === undefined)
      throw kmsError('STORE_CORRUPT', 'the active KEK version is missing from the registry');
    if (existing !== undefined) {
      const storedKcv = (await this.#registry.kcv()) ?? null;
      const keks = [active, ...this.#registry.keks().filter((k) => k.version !== active.version)];
      const check = await this.#pool.run<CheckKekResult>({
        type: 'check-kek',
        keks: keks.map((k) => this.#kekRef(k.version)!),
        kcv: storedKcv === null ? null : new Uint8Array(storedKcv),
      });
      if (!check.ok) {
        throw kmsError(
          'MASTER_KEY_MISMATCH',
          `the master key does not match the data directory ${this.#opts.dataDir}: it cannot unwrap the stored KEK. ` +
            'Nothing was changed. Use the master key this directory was created with.',
        );
      }
      // Only now, with the key proven, may the directory be touched: a registry from before key check
      // values gets one, then the log is repaired and gets the start line.
      if (storedKcv === null && check.kcv !== null) {
        this.#registry.putKcv(check.kcv);
        this.#log.info('stored the master key check value (registry written by an older version)');
      }
      const dropped = this.#repairAuditLog();
      this.#auditHeads?.begin();
      if (dropped > 0) {
        await this.#note({
          op: 'audit_repair',
          detail: `dropped ${dropped} bytes of a block cut short by a crash`,
        });
      }
      await this.#note({ op: 'start', kekVersion: active.version, detail: `pid ${process.pid}` });
    }
    this.#rotation = new KekRotation({
      registry: this.#registry,
      pool: this.#pool,
      batchSize: this.#opts.rotationBatchSize,
      kekId: () => this.#kek.kekId,
      newKek: async (version, audit) => {
        const result = await this.#newKek({ type: 'new-kek', kekId: this.#kek.kekId, version, audit });
        return result.wrapped;
      },
      note: (audit) => this.#note(audit),
      onActiveChanged: (version) => {
        this.#kek = { ...this.#kek, activeVersion: version };
      },
    });
    if (this.#rotation.interrupted && this.#opts.resumeRotation) {
      this.#log.warn('resuming an interrupted KEK rotation');
      this.#rotation.run({ caller: 'kms-startup' }).catch((err) => {
        this.#log.error(
          { code: toCodedError(err).code },
          'resumed KEK rotation failed; it will resume on the next call',
        );
      });
    }
  }

  /** Creates a KEK version in a worker; its audit line counts like a batch's. */
  async #newKek(task: NewKekTask): Promise<NewKekResult> {
    const result = await this.#pool.run<NewKekResult>(task);
    this.#auditHeads?.report(result.auditHead);
    this.#auditFile?.markDirty();
    return result;
  }

  #kekRef(version: number): KekRef | undefined {
    let ref = this.#kekRefs.get(version);
    if (ref === undefined) {
      const record = this.#registry.kek(version);
      if (record === undefined) return undefined;
      ref = { kekId: record.kekId, version: record.version, wrapped: new Uint8Array(record.wrapped) };
      this.#kekRefs.set(version, ref);
    }
    return ref;
  }

  /**
   * Audit fields for a successful data op, shared by every op with the same record, op, KEK
   * version and caller context, so a batch sends them to the worker once (the pool dedupes by
   * identity). A handful of slots per record, matched by identity: no allocation on a hit.
   */
  #dataAudit(op: string, ctx: CallContext | undefined, record: DekRecord, kekVersion: number): AuditFields {
    let slots = this.#auditCache.get(record);
    if (slots === undefined) {
      slots = [];
      this.#auditCache.set(record, slots);
    }
    // By value: callers (the server, the daemon) make a fresh context per request, and a new
    // fields object per op would be sent, and rendered into its audit line, once per op.
    const caller = ctx?.caller;
    const remote = ctx?.remoteAddress;
    for (const slot of slots) {
      if (
        slot.op === op &&
        slot.caller === caller &&
        slot.remote === remote &&
        slot.kekVersion === kekVersion
      ) {
        return slot.fields;
      }
    }
    const fields = this.#audit(op, ctx, record.keyId, record, kekVersion);
    if (slots.length >= AUDIT_SLOTS_PER_RECORD) slots.shift();
    slots.push({ op, caller, remote, kekVersion, fields });
    return fields;
  }

  #audit(
    op: string,
    ctx: CallContext | undefined,
    keyId?: string,
    record?: DekRecord,
    kekVersion?: number,
  ): AuditFields {
    return {
      op,
      keyId,
      threadId: record?.threadId,
      kekVersion,
      caller: ctx?.caller ?? 'embedded',
      remote: ctx?.remoteAddress,
    };
  }

  /** Queues one op; the callback form lets batch callers avoid a promise per item. */
  #enqueue(
    kind: OpKindValue,
    deks: DekRef[],
    input: Uint8Array | null,
    aad: Uint8Array | null,
    audit: AuditFields | null,
    preError: ErrorCode | null,
    done: PendingOp['done'],
  ): void {
    if (this.#closed) {
      done('NOT_READY', null, 0);
      return;
    }
    if (this.#auditFile?.failed) {
      // Fail closed: one worker's failed audit write stops every worker's key use.
      done('AUDIT_WRITE_FAILED', null, 0);
      return;
    }
    if (!this.#opts.audit && (kind === OpKind.note || preError !== null)) {
      // Nothing to sign and nothing to compute: settle without a worker trip.
      done(preError, preError === null ? Buffer.alloc(0) : null, 0);
      return;
    }
    this.#pool.enqueue({ kind, deks, input, aad, audit: this.#opts.audit ? audit : null, preError, done });
  }

  /** Writes one audit line and uses no key (start, stop, destroys, existing keys). */
  #note(audit: AuditFields): Promise<void> {
    return this.#run(OpKind.note, [], null, null, audit, null).then(() => undefined);
  }

  #run(
    kind: OpKindValue,
    deks: DekRef[],
    input: Uint8Array | null,
    aad: Uint8Array | null,
    audit: AuditFields | null,
    preError: ErrorCode | null,
    message?: string,
  ): Promise<OpOutput> {
    return new Promise((resolve, reject) => {
      this.#enqueue(kind, deks, input, aad, audit, preError, (error, output, keyVersion) => {
        if (error === null) resolve({ output: output!, keyVersion });
        else reject(kmsError(error, error === preError ? message : undefined));
      });
    });
  }

  /** A key's record, asking the registry's store when it is not known locally. */
  async #fetchRecord(keyId: string): Promise<DekRecord | undefined> {
    return this.#registry.peekDek(keyId) ?? (await this.#registry.dek(keyId));
  }

  #info(record: DekRecord): DekInfo {
    const current = currentVersion(record);
    return {
      keyId: record.keyId,
      threadId: record.threadId,
      kekId: this.#kek.kekId,
      kekVersion: current.kek,
      keyVersion: record.current,
      wrapped: Buffer.from(current.wrapped),
      createdAt: record.createdAt,
    };
  }

  // --- create / get ------------------------------------------------------------------------

  /** After close() the registry is closed too: every call fails with NOT_READY, never an LMDB error. */
  #assertOpen(): void {
    if (this.#closed) throw kmsError('NOT_READY', 'the KMS is closed');
  }

  createDekForThread(threadId: string, ctx?: CallContext): Promise<DekInfo> {
    if (this.#closed) return Promise.reject(kmsError('NOT_READY', 'the KMS is closed'));
    let id: string;
    try {
      id = checkId('thread_id', threadId);
    } catch (err) {
      return this.#auditedFailure('create_dek_for_thread', ctx, err as CodedError);
    }
    const existingId = this.#registry.peekKeyIdForThread(id);
    if (existingId === undefined) {
      return this.#registry.keyIdForThread(id).then((found) => this.#createOrGet(id, found, ctx));
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
      const audit = this.#audit(
        'create_dek_for_thread',
        ctx,
        existing.keyId,
        existing,
        existing.versions.at(-1)?.kek,
      );
      return this.#note({ ...audit, detail: 'existing' }).then(() => this.#info(existing));
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
    const kekVersion = this.#kek.activeVersion;
    const template: DekRef = { keyId, keyVersion: 1, kekVersion, wrapped: new Uint8Array(0) };
    const audit = this.#audit('create_dek_for_thread', ctx, keyId, undefined, kekVersion);
    const { output } = await this.#run(OpKind.generate, [template], null, null, { ...audit, threadId }, null);
    const now = new Date().toISOString();
    const stored = await this.#registry.createDek({
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
    this.#assertOpen();
    const found = isValidId(keyId) ? await this.#fetchRecord(keyId) : undefined;
    const record = found?.state === 'active' ? found : undefined;
    const preError = this.#idError(keyId) ?? (record === undefined ? 'KEY_NOT_FOUND' : null);
    const audit = this.#audit('get_wrapped', ctx, isValidId(keyId) ? keyId : undefined, record);
    await this.#run(OpKind.note, [], null, null, audit, preError, this.#notFoundMessage(keyId));
    return this.#info(record!);
  }

  #idError(keyId: unknown): ErrorCode | null {
    return isValidId(keyId) ? null : 'INVALID_INPUT';
  }

  #notFoundMessage(keyId: unknown): string | undefined {
    return isValidId(keyId) ? `no key ${keyId}` : undefined;
  }

  #auditedFailure<T>(op: string, ctx: CallContext | undefined, err: CodedError, keyId?: string): Promise<T> {
    return this.#run(OpKind.note, [], null, null, this.#audit(op, ctx, keyId), err.code, err.message).then(
      () => {
        throw err;
      },
    );
  }

  // --- encrypt / decrypt -------------------------------------------------------------------

  /**
   * Prepares one encrypt, decrypt or reencrypt op. A validation failure or unknown key becomes a
   * pre-dispatch error, which the worker still audits.
   */
  #prepare(
    kind: OpKindValue,
    op: string,
    keyId: unknown,
    data: unknown,
    aad: unknown,
    ctx: CallContext | undefined,
  ): PreparedOp {
    // An invalid id is not written into the audit line (it may be megabytes long).
    const id = isValidId(keyId) ? keyId : undefined;
    let record: DekRecord | undefined;
    let unknownKey: string | undefined;
    let deks: DekRef[] = [];
    try {
      this.#assertOpen();
      checkId('key_id', keyId);
      const max = kind === OpKind.encrypt ? MAX_PLAINTEXT_BYTES : MAX_PLAINTEXT_BYTES + CIPHERTEXT_OVERHEAD;
      const input = checkBytes(kind === OpKind.encrypt ? 'plaintext' : 'ciphertext', data, max);
      const aadBytes = checkAad(aad);
      const known = this.#registry.peekDek(id!);
      record = known?.state === 'active' ? known : undefined;
      if (record === undefined) {
        if (known === undefined) unknownKey = id;
        throw kmsError('KEY_NOT_FOUND', `no key ${id}`);
      }
      deks = dataOpRefs(record, op as 'encrypt' | 'decrypt' | 'reencrypt', input);
      const audit = this.#dataAudit(op, ctx, record, deks[0]!.kekVersion);
      return { kind, deks, input, aad: aadBytes, audit, preError: null, message: undefined, unknownKey };
    } catch (err) {
      const coded = toCodedError(err);
      const audit = this.#audit(op, ctx, id, record);
      const message = coded.message;
      return { kind, deks: [], input: null, aad: null, audit, preError: coded.code, message, unknownKey };
    }
  }

  #submit(
    p: PreparedOp,
    done: (error: CodedError | null, output: Buffer | null, keyVersion: number) => void,
  ): void {
    this.#enqueue(p.kind, p.deks, p.input, p.aad, p.audit, p.preError, (code, output, keyVersion) => {
      done(code === null ? null : kmsError(code, opErrorMessage(p, code)), output, keyVersion);
    });
  }

  #single(
    kind: OpKindValue,
    op: string,
    keyId: string,
    data: Uint8Array,
    aad: Uint8Array | undefined,
    ctx: CallContext | undefined,
  ): Promise<OpOutput> {
    const prepared = this.#prepare(kind, op, keyId, data, aad, ctx);
    if (prepared.unknownKey === undefined) return this.#submitOne(prepared);
    // Not known locally: one fetch from the registry's store, then the op as if it had been.
    return this.#registry
      .dek(prepared.unknownKey)
      .then(() => this.#submitOne(this.#prepare(kind, op, keyId, data, aad, ctx)));
  }

  #submitOne(prepared: PreparedOp): Promise<OpOutput> {
    return new Promise((resolve, reject) => {
      this.#submit(prepared, (error, output, keyVersion) => {
        if (error === null) resolve({ output: output!, keyVersion });
        else reject(error);
      });
    });
  }

  async encrypt(
    keyId: string,
    plaintext: Uint8Array,
    aad?: Uint8Array,
    ctx?: CallContext,
  ): Promise<EncryptResult> {
    const { output, keyVersion } = await this.#single(OpKind.encrypt, 'encrypt', keyId, plaintext, aad, ctx);
    return { ciphertext: output, keyVersion };
  }

  async decrypt(keyId: string, ciphertext: Uint8Array, aad?: Uint8Array, ctx?: CallContext): Promise<Buffer> {
    return (await this.#single(OpKind.decrypt, 'decrypt', keyId, ciphertext, aad, ctx)).output;
  }

  async reencrypt(
    keyId: string,
    ciphertext: Uint8Array,
    aad?: Uint8Array,
    ctx?: CallContext,
  ): Promise<EncryptResult> {
    const { output, keyVersion } = await this.#single(
      OpKind.reencrypt,
      'reencrypt',
      keyId,
      ciphertext,
      aad,
      ctx,
    );
    return { ciphertext: output, keyVersion };
  }

  /** Each item is its own op (so large batches spread over the workers) with its own result. */
  #batch<T>(
    kind: OpKindValue,
    op: string,
    items: readonly (EncryptItem | DecryptItem)[],
    ctx: CallContext | undefined,
    wrap: (output: Buffer, keyVersion: number) => T,
  ): Promise<ItemResult<T>[]> {
    if (!Array.isArray(items)) return Promise.reject(kmsError('INVALID_INPUT', 'items must be an array'));
    const results: ItemResult<T>[] = new Array(items.length);
    if (items.length === 0) return Promise.resolve(results);
    const prepareItem = (item: EncryptItem | DecryptItem) => {
      const value = item as Partial<EncryptItem & DecryptItem> | null;
      const data = kind === OpKind.encrypt ? value?.plaintext : value?.ciphertext;
      return this.#prepare(kind, op, value?.keyId, data, value?.aad, ctx);
    };
    const prepared = items.map(prepareItem);
    const unknown = new Set<string>();
    for (const p of prepared) if (p.unknownKey !== undefined) unknown.add(p.unknownKey);
    if (unknown.size === 0) return this.#submitAll(prepared, results, wrap);
    // Keys not known locally are fetched first, then the whole batch goes in its order.
    return Promise.all([...unknown].map((keyId) => this.#registry.dek(keyId))).then(() => {
      for (let i = 0; i < prepared.length; i++) {
        if (prepared[i]!.unknownKey !== undefined) prepared[i] = prepareItem(items[i]!);
      }
      return this.#submitAll(prepared, results, wrap);
    });
  }

  #submitAll<T>(
    prepared: PreparedOp[],
    results: ItemResult<T>[],
    wrap: (output: Buffer, keyVersion: number) => T,
  ): Promise<ItemResult<T>[]> {
    return new Promise((resolve) => {
      let pending = prepared.length;
      prepared.forEach((p, i) => {
        this.#submit(p, (error, output, keyVersion) => {
          results[i] = error === null ? { ok: true, value: wrap(output!, keyVersion) } : { ok: false, error };
          if (--pending === 0) resolve(results);
        });
      });
    });
  }

  encryptBatch(items: readonly EncryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.#batch(OpKind.encrypt, 'encrypt', items, ctx, encryptResult);
  }

  reencryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.#batch(OpKind.reencrypt, 'reencrypt', items, ctx, encryptResult);
  }

  decryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<Buffer>[]> {
    return this.#batch(OpKind.decrypt, 'decrypt', items, ctx, (plaintext) => plaintext);
  }

  // --- key versions ------------------------------------------------------------------------

  async rewrapDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    this.#assertOpen();
    const record = await this.#requireKey('rewrap', keyId, ctx);
    const target = this.#kek.activeVersion;
    const rewrapped = await Promise.all(
      record.versions.map(async (version) => {
        const ref = dekRef(record, version.v)!;
        const audit = {
          ...this.#audit('rewrap', ctx, keyId, record, target),
          detail: `key version ${version.v}`,
        };
        const { output } = await this.#run(OpKind.rewrap, [ref], null, null, audit, null);
        return { v: version.v, from: version.wrapped, to: Buffer.from(output), toKek: target };
      }),
    );
    const updated = await this.#registry.updateDek(
      keyId,
      (current) => applyVersionRewraps(requireActive(current), rewrapped).record,
    );
    return this.#info(updated);
  }

  async rotateDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    this.#assertOpen();
    const record = await this.#requireKey('rotate_dek', keyId, ctx);
    const version = nextVersion(record);
    const kekVersion = this.#kek.activeVersion;
    const template: DekRef = { keyId, keyVersion: version, kekVersion, wrapped: new Uint8Array(0) };
    const audit = {
      ...this.#audit('rotate_dek', ctx, keyId, record, kekVersion),
      detail: `new key version ${version}`,
    };
    const { output } = await this.#run(OpKind.generate, [template], null, null, audit, null);
    const now = new Date().toISOString();
    const updated = await this.#registry.updateDek(keyId, (current) =>
      addVersion(current, { v: version, kek: kekVersion, wrapped: Buffer.from(output), createdAt: now }),
    );
    return this.#info(updated);
  }

  async destroyDekVersionsBefore(
    keyId: string,
    keepFromVersion: number,
    ctx?: CallContext,
  ): Promise<DestroyResult> {
    this.#assertOpen();
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
    const updated = await this.#registry.updateDek(keyId, (current) => {
      const result = destroyVersionsBefore(current, keepFromVersion);
      destroyed = result.destroyed;
      return result.record;
    });
    return this.#destroyed('destroy_dek_versions', ctx, updated, destroyed);
  }

  async destroyDek(keyId: string, ctx?: CallContext): Promise<DestroyResult> {
    this.#assertOpen();
    // Destroyed keys count as found here: destroying one again is a no-op, not an error.
    const record = this.#idError(keyId) === null ? await this.#fetchRecord(keyId) : undefined;
    if (record === undefined) await this.#rejectMissingKey('destroy_dek', keyId, ctx);
    let destroyed: number[] = [];
    const updated = await this.#registry.updateDek(keyId, (current) => {
      const result = destroyAll(current, new Date().toISOString());
      destroyed = result.destroyed;
      return result.record;
    });
    return this.#destroyed('destroy_dek', ctx, updated, destroyed);
  }

  /** After a destroy commits: every worker drops the key's cached versions; the audit line says which. */
  async #destroyed(
    op: string,
    ctx: CallContext | undefined,
    record: DekRecord,
    destroyed: number[],
  ): Promise<DestroyResult> {
    this.#pool.evict(record.keyId);
    const audit = {
      ...this.#audit(op, ctx, record.keyId, record),
      detail: `destroyed [${destroyed.join(',')}]`,
    };
    await this.#note(audit);
    return { keyId: record.keyId, destroyedVersions: destroyed };
  }

  /** Resolves an active key or fails with an audited KEY_NOT_FOUND / INVALID_INPUT. */
  async #requireKey(op: string, keyId: unknown, ctx: CallContext | undefined): Promise<DekRecord> {
    const found = this.#idError(keyId) === null ? await this.#fetchRecord(keyId as string) : undefined;
    return found?.state === 'active' ? found : this.#rejectMissingKey(op, keyId, ctx);
  }

  /** Audits a call that names no usable key (malformed or unknown id), then fails it. */
  #rejectMissingKey(op: string, keyId: unknown, ctx: CallContext | undefined): Promise<never> {
    const audit = this.#audit(op, ctx, isValidId(keyId) ? keyId : undefined);
    const code = this.#idError(keyId) ?? 'KEY_NOT_FOUND';
    // A note op with a pre-dispatch error always rejects, after its audit line is written.
    return this.#run(
      OpKind.note,
      [],
      null,
      null,
      audit,
      code,
      this.#notFoundMessage(keyId),
    ) as Promise<never>;
  }

  // --- KEK rotation ------------------------------------------------------------------------

  rotateKek(ctx?: CallContext): Promise<RotationStatus> {
    if (this.#closed) return Promise.reject(kmsError('NOT_READY', 'the KMS is closed'));
    return this.#rotation.run(ctx);
  }

  async startKekRotation(ctx?: CallContext): Promise<RotationStatus> {
    if (this.#closed) throw kmsError('NOT_READY', 'the KMS is closed');
    const running = this.#rotation.run(ctx);
    running.catch((err) => {
      this.#log.error(
        { code: toCodedError(err).code },
        'KEK rotation failed; it will resume on the next call',
      );
    });
    // Running from this moment, even while the new KEK is still being made (see KekRotation).
    return this.#rotation.status();
  }

  async rotationStatus(): Promise<RotationStatus> {
    this.#assertOpen();
    return this.#rotation.status();
  }

  async health(): Promise<KmsHealth> {
    this.#assertOpen();
    return {
      ok: !this.#closed && !(this.#auditFile?.failed ?? false),
      mode: 'embedded',
      kekId: this.#kek.kekId,
      activeKekVersion: this.#kek.activeVersion,
      dekCount: await this.#registry.dekCount(),
      poolThreads: this.#pool.threads,
      queueDepth: this.#pool.queueDepth,
      rotation: this.#rotation.status(),
    };
  }

  /** Verifies this data directory's audit log inside a worker. */
  verifyAudit(): Promise<VerifyAuditResult> {
    if (this.#closed) return Promise.reject(kmsError('NOT_READY', 'the KMS is closed'));
    return this.#pool.run<VerifyAuditResult>({
      type: 'verify-audit',
      path: path.join(this.#opts.dataDir, AUDIT_FILE_NAME),
      head: this.#registry.auditHead() ?? null,
    });
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    await this.#rotation?.stop();
    await this.#pool.idle();
    let stopped = false;
    if (this.#opts.audit && !(this.#auditFile?.failed ?? true)) {
      // The stop line names every stream's end, so no stream of this session can be cut unseen.
      const heads = this.#auditHeads?.stopHeads();
      stopped = await this.#note({ op: 'stop', detail: `pid ${process.pid}`, heads }).then(
        () => true,
        () => false,
      );
    }
    this.#closed = true;
    const { workers, zeroed } = await this.#pool.close();
    // Not expected: workers that did not answer are stopped anyway, and their memory freed unzeroed.
    if (zeroed < workers)
      this.#log.warn(`only ${zeroed} of ${workers} crypto workers confirmed zeroing their keys`);
    this.#auditFile?.close();
    // Sealed only once the stop line is on disk (close fsyncs).
    if (stopped && !(this.#auditFile?.failed ?? true)) {
      this.#auditHeads?.seal();
    }
    await this.#registry.close();
    this.#lock.release();
  }

  /** Used when start-up fails half-way: release everything without writing more. */
  async abort(): Promise<void> {
    this.#closed = true;
    await this.#pool.close().catch(() => {});
    this.#auditFile?.close();
    await this.#registry.close().catch(() => {});
    this.#lock.release();
  }
}

export type EmbeddedKmsHandle = Kms & { verifyAudit(): Promise<VerifyAuditResult> };

/**
 * Opens the KMS on a data directory. Fails (and releases everything) with a clear CodedError when
 * the directory is locked, the audit log is not writable, or the master key is missing, malformed
 * or does not match the stored KEK. Nothing stored is changed by a failed start.
 */
export async function createKms(options: KmsOptions = {}): Promise<EmbeddedKmsHandle> {
  const opts = resolveKmsOptions(options);
  const log = options.logger ?? silentLogger;
  fs.mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  const lock = lockDataDir(opts.dataDir);
  let auditFile: AuditFile | null = null;
  let registry: Registry | null = null;
  try {
    auditFile = opts.audit
      ? AuditFile.open(path.join(opts.dataDir, AUDIT_FILE_NAME), opts.auditFsyncMs)
      : null;
    registry = await openRegistry(opts.dataDir, opts.registry);
  } catch (err) {
    auditFile?.close();
    lock.release();
    throw toCodedError(err);
  }
  const kms = new EmbeddedKms(opts, log, registry, auditFile, lock);
  try {
    await kms.start();
  } catch (err) {
    await kms.abort();
    const coded = toCodedError(err);
    // An audit write failing during start-up means the log is not writable.
    throw coded.code === 'AUDIT_WRITE_FAILED' ? kmsError('AUDIT_UNWRITABLE', coded.message) : coded;
  }
  return kms;
}

function encryptResult(ciphertext: Buffer, keyVersion: number): EncryptResult {
  return { ciphertext, keyVersion };
}

export { generateMasterKey, generateMasterKeyFile } from './keygen.js';
