/**
 * The data plane of the embedded KMS: encrypt, decrypt and reencrypt, one at a time or in
 * batches. This is the hot path: each item is checked, resolved against the registry (a sync
 * peek; a key not known locally costs one fetch and the item is prepared again) and queued as
 * its own op, with no promise per item in a batch and audit fields shared by identity.
 */
import type { CallContext, DecryptItem, EncryptItem, EncryptResult, ItemResult } from '../api/index.js';
import { type CodedError, type ErrorCode, kmsError, toCodedError } from '../errors.js';
import { MAX_CIPHERTEXT_OVERHEAD } from '../format.js';
import { type AuditFields, type DekRef, OpKind, type OpKindValue } from '../worker-abi/index.js';
import { type DekRecord, dataOpRefs, pendingDeletionError } from './dek-versions.js';
import { auditFields, type OpQueue, type QueuedOp } from './op-queue.js';
import type { Registry } from './registry/index.js';
import {
  checkAad,
  checkBytes,
  checkId,
  isValidId,
  MAX_ID_LENGTH,
  MAX_PLAINTEXT_BYTES,
} from './validate-args.js';

type DataOp = 'encrypt' | 'decrypt' | 'reencrypt';

/** An op checked and resolved against the registry, ready to queue. */
interface PreparedOp extends QueuedOp {
  audit: AuditFields;
  message: string | undefined;
  /** A key id the registry did not know locally: fetch it, then prepare the op again. */
  unknownKey: string | undefined;
}

type Done = (error: CodedError | null, output: Buffer | null, keyVersion: number) => void;

/** A worker sends codes only; a corrupt record is named (by key id, never its bytes) for the operator. */
function opErrorMessage(p: PreparedOp, code: ErrorCode): string | undefined {
  if (code === p.preError) return p.message;
  const keyId = p.deks[0]?.keyId;
  if (code === 'STORE_CORRUPT' && keyId !== undefined) {
    return `the stored record of key ${keyId} is corrupt (its wrapped key or the KEK version it names)`;
  }
  return undefined;
}

function encryptResult(ciphertext: Buffer, keyVersion: number): EncryptResult {
  return { ciphertext, keyVersion };
}

function plaintextResult(plaintext: Buffer): Buffer {
  return plaintext;
}

interface AuditSlot {
  op: string;
  caller: string | undefined;
  remote: string | undefined;
  kekVersion: number;
  fields: AuditFields;
}

const AUDIT_SLOTS_PER_RECORD = 8;

export class DataPlane {
  readonly #auditCache = new WeakMap<DekRecord, AuditSlot[]>();

  constructor(
    private readonly queue: OpQueue,
    private readonly registry: Registry,
    private readonly assertOpen: () => void,
  ) {}

  // Not async: each call resolves the one promise #single makes, with no second one (and no
  // extra microtask turn) per op to unwrap its result.
  encrypt(keyId: string, plaintext: Uint8Array, aad?: Uint8Array, ctx?: CallContext): Promise<EncryptResult> {
    return this.#single(OpKind.encrypt, 'encrypt', keyId, plaintext, aad, ctx, encryptResult);
  }

  decrypt(keyId: string, ciphertext: Uint8Array, aad?: Uint8Array, ctx?: CallContext): Promise<Buffer> {
    return this.#single(OpKind.decrypt, 'decrypt', keyId, ciphertext, aad, ctx, plaintextResult);
  }

  reencrypt(
    keyId: string,
    ciphertext: Uint8Array,
    aad?: Uint8Array,
    ctx?: CallContext,
  ): Promise<EncryptResult> {
    return this.#single(OpKind.reencrypt, 'reencrypt', keyId, ciphertext, aad, ctx, encryptResult);
  }

  encryptBatch(items: readonly EncryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.#batch(OpKind.encrypt, 'encrypt', items, ctx, encryptResult);
  }

  reencryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.#batch(OpKind.reencrypt, 'reencrypt', items, ctx, encryptResult);
  }

  decryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<Buffer>[]> {
    return this.#batch(OpKind.decrypt, 'decrypt', items, ctx, plaintextResult);
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
    const fields = auditFields(op, ctx, record.keyId, record.threadId, kekVersion);
    if (slots.length >= AUDIT_SLOTS_PER_RECORD) slots.shift();
    slots.push({ op, caller, remote, kekVersion, fields });
    return fields;
  }

  /**
   * Prepares one encrypt, decrypt or reencrypt op. A validation failure or unknown key becomes a
   * pre-dispatch error, which the worker still audits.
   */
  #prepare(
    kind: OpKindValue,
    op: DataOp,
    keyId: unknown,
    data: unknown,
    aad: unknown,
    ctx: CallContext | undefined,
  ): PreparedOp {
    // A plausible id is looked up first: one the registry holds was checked in full when it was
    // made, so only an unknown one pays for the character-by-character check.
    const plausible = typeof keyId === 'string' && keyId.length > 0 && keyId.length <= MAX_ID_LENGTH;
    let known: DekRecord | undefined;
    let record: DekRecord | undefined;
    let unknownKey: string | undefined;
    try {
      this.assertOpen();
      known = plausible ? this.registry.peekDek(keyId) : undefined;
      const checkedId = known === undefined ? checkId('key_id', keyId) : (keyId as string);
      const max =
        kind === OpKind.encrypt ? MAX_PLAINTEXT_BYTES : MAX_PLAINTEXT_BYTES + MAX_CIPHERTEXT_OVERHEAD;
      const input = checkBytes(kind === OpKind.encrypt ? 'plaintext' : 'ciphertext', data, max);
      const aadBytes = checkAad(aad);
      if (known?.state === 'pending-deletion') {
        record = known;
        throw pendingDeletionError(known);
      }
      record = known?.state === 'active' ? known : undefined;
      if (record === undefined) {
        if (known === undefined) unknownKey = checkedId;
        throw kmsError('KEY_NOT_FOUND', `no key ${checkedId}`);
      }
      const deks = dataOpRefs(record, op, input);
      const audit = this.#dataAudit(op, ctx, record, (deks[0] as DekRef).kekVersion);
      return { kind, deks, input, aad: aadBytes, audit, preError: null, message: undefined, unknownKey };
    } catch (err) {
      const coded = toCodedError(err);
      // An invalid id is not written into the audit line (it may be megabytes long).
      const id = known !== undefined || isValidId(keyId) ? (keyId as string) : undefined;
      const audit = auditFields(op, ctx, id, record?.threadId);
      const message = coded.message;
      return { kind, deks: [], input: null, aad: null, audit, preError: coded.code, message, unknownKey };
    }
  }

  #submit(p: PreparedOp, done: Done): void {
    this.queue.enqueue(p, (code, output, keyVersion) => {
      done(code === null ? null : kmsError(code, opErrorMessage(p, code)), output, keyVersion);
    });
  }

  #single<T>(
    kind: OpKindValue,
    op: DataOp,
    keyId: string,
    data: Uint8Array,
    aad: Uint8Array | undefined,
    ctx: CallContext | undefined,
    wrap: (output: Buffer, keyVersion: number) => T,
  ): Promise<T> {
    const refusal = this.#refusal();
    if (refusal !== null) return Promise.reject(refusal);
    const prepared = this.#prepare(kind, op, keyId, data, aad, ctx);
    if (prepared.unknownKey === undefined) return this.#submitOne(prepared, wrap);
    // Not known locally: one fetch from the registry's store, then the op as if it had been.
    return this.registry
      .dek(prepared.unknownKey)
      .then(() => this.#submitOne(this.#prepare(kind, op, keyId, data, aad, ctx), wrap));
  }

  /**
   * A cluster replica that may not serve (no live etcd lease) refuses the whole call with
   * REGISTRY_UNAVAILABLE, never item by item, so a client moves it to another replica.
   */
  #refusal(): CodedError | null {
    try {
      this.registry.assertServing();
      return null;
    } catch (err) {
      return toCodedError(err);
    }
  }

  #submitOne<T>(prepared: PreparedOp, wrap: (output: Buffer, keyVersion: number) => T): Promise<T> {
    // The queue's callback settles the promise itself: one closure per op, not two (the hot path).
    return new Promise((resolve, reject) => {
      this.queue.enqueue(prepared, (code, output, keyVersion) => {
        if (code === null) resolve(wrap(output as Buffer, keyVersion));
        else reject(kmsError(code, opErrorMessage(prepared, code)));
      });
    });
  }

  /** Each item is its own op (so large batches spread over the workers) with its own result. */
  #batch<T>(
    kind: OpKindValue,
    op: DataOp,
    items: readonly (EncryptItem | DecryptItem)[],
    ctx: CallContext | undefined,
    wrap: (output: Buffer, keyVersion: number) => T,
  ): Promise<ItemResult<T>[]> {
    if (!Array.isArray(items)) return Promise.reject(kmsError('INVALID_INPUT', 'items must be an array'));
    const refusal = this.#refusal();
    if (refusal !== null) return Promise.reject(refusal);
    const results: ItemResult<T>[] = new Array(items.length);
    if (items.length === 0) return Promise.resolve(results);
    const prepareItem = (item: EncryptItem | DecryptItem | undefined) => {
      const value = item as Partial<EncryptItem & DecryptItem> | null | undefined;
      const data = kind === OpKind.encrypt ? value?.plaintext : value?.ciphertext;
      return this.#prepare(kind, op, value?.keyId, data, value?.aad, ctx);
    };
    const prepared = items.map(prepareItem);
    const unknown = new Set<string>();
    for (const p of prepared) if (p.unknownKey !== undefined) unknown.add(p.unknownKey);
    if (unknown.size === 0) return this.#submitAll(prepared, results, wrap);
    // Keys not known locally are fetched first, then the whole batch goes in its order.
    return Promise.all([...unknown].map((keyId) => this.registry.dek(keyId))).then(() => {
      prepared.forEach((p, i) => {
        if (p.unknownKey !== undefined) prepared[i] = prepareItem(items[i]);
      });
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
          results[i] =
            error === null ? { ok: true, value: wrap(output as Buffer, keyVersion) } : { ok: false, error };
          if (--pending === 0) resolve(results);
        });
      });
    });
  }
}
