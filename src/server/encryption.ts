/**
 * Message body ⇄ stored content.
 *
 * Every ciphertext is made with the thread's DEK and AAD naming the thread and the message, so a
 * ciphertext copied onto another message or thread fails to decrypt (DECRYPT_FAILED, 422) instead
 * of showing the wrong content.
 *
 * With no field policy the whole body (its JSON text) is encrypted. With a policy such as
 * `text, attachments.*.url`, the values at those paths are taken out of the body and encrypted
 * together as one ciphertext (one KMS operation per message either way); the rest of the body stays
 * readable in the store, e.g. for search.
 *
 * The walk over a body touches own properties only, and a policy refuses bodies whose matched paths
 * go through `__proto__`, `constructor` or `prototype`: a restored value can never be written onto a
 * prototype (which would break every request of the process), whatever the body or the store holds.
 */

import type { CallContext, DecryptItem, EncryptResult, ItemResult, Kms } from '../api/index.js';
import { type CodedError, kmsError, UserError } from '../errors.js';
import type { MessageContent, MessageRecord } from './store.js';

type PathStep = string | number;
/** The secret values of one body: concrete path → value. */
type Secrets = [PathStep[], unknown][];

/** Keys a policy path may not go through: assigning through them reaches a prototype. */
const PROTOTYPE_KEYS: ReadonlySet<string> = new Set(['__proto__', 'constructor', 'prototype']);

export function messageAad(threadId: string, messageId: string): Buffer {
  return Buffer.from(`progressdb/v1/message/${threadId}/${messageId}`);
}

/** Batch encrypt results as stored contents, each with the readable rest of its body. */
function storedContents(
  results: readonly ItemResult<EncryptResult>[],
  restOf: (index: number) => string | undefined,
): ItemResult<MessageContent>[] {
  return results.map((r, i) => {
    if (!r.ok) return r;
    const rest = restOf(i);
    const content: MessageContent = { ct: r.value.ciphertext, kv: r.value.keyVersion };
    if (rest !== undefined) content.rest = rest;
    return { ok: true, value: content };
  });
}

export class BodyCodec {
  constructor(
    private readonly kms: Kms | null,
    /** Field policy (paths relative to the body, `*` = any key or index), or null for the whole body. */
    private readonly fields: readonly (readonly string[])[] | null,
  ) {}

  /** Content stored for a body when its thread has no DEK. */
  static plain(body: unknown): MessageContent {
    return { plain: JSON.stringify(body) };
  }

  /** Encrypts a body for a message of a thread with DEK `keyId`. */
  async seal(
    keyId: string,
    threadId: string,
    messageId: string,
    body: unknown,
    ctx: CallContext,
  ): Promise<MessageContent> {
    const { plaintext, rest } = this.split(body);
    const { ciphertext, keyVersion } = await this.requireKms().encrypt(
      keyId,
      plaintext,
      messageAad(threadId, messageId),
      ctx,
    );
    return rest === undefined ? { ct: ciphertext, kv: keyVersion } : { ct: ciphertext, kv: keyVersion, rest };
  }

  /** Encrypts stored plaintext messages of one thread in one batch (encrypt-threads). */
  async sealBatch(
    keyId: string,
    threadId: string,
    records: readonly MessageRecord[],
    ctx: CallContext,
  ): Promise<ItemResult<MessageContent>[]> {
    const parts = records.map((r) => this.splitStored(JSON.parse(r.plain ?? 'null')));
    const results = await this.requireKms().encryptBatch(
      // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
      parts.map((p, i) => ({ keyId, plaintext: p.plaintext, aad: messageAad(threadId, records[i]!.id) })),
      ctx,
    );
    // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
    return storedContents(results, (i) => parts[i]!.rest);
  }

  /**
   * Re-encrypts stored ciphertexts of one thread under the DEK's current version, inside the KMS,
   * in one batch (rotate-thread-dek); each message gets its own result or error.
   */
  async reencryptBatch(
    keyId: string,
    threadId: string,
    records: readonly MessageRecord[],
    ctx: CallContext,
  ): Promise<ItemResult<MessageContent>[]> {
    const results = await this.requireKms().reencryptBatch(
      // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
      records.map((r) => ({ keyId, ciphertext: r.ct!, aad: messageAad(threadId, r.id) })),
      ctx,
    );
    // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
    return storedContents(results, (i) => records[i]!.rest);
  }

  /**
   * Bodies of the given messages of one thread, in order, with one KMS call for the whole page.
   * Per-message failures (DECRYPT_FAILED) come back as items; KMS_UNAVAILABLE rejects the call.
   */
  async openPage(
    keyId: string | null,
    threadId: string,
    records: readonly MessageRecord[],
    ctx: CallContext,
  ): Promise<ItemResult<unknown>[]> {
    const out: ItemResult<unknown>[] = new Array(records.length);
    const items: DecryptItem[] = [];
    const at: number[] = [];
    records.forEach((r, i) => {
      if (r.ct === undefined) {
        out[i] = { ok: true, value: JSON.parse(r.plain ?? 'null') };
      } else if (keyId === null) {
        out[i] = { ok: false, error: kmsError('KEY_NOT_FOUND', 'the thread has no DEK for this ciphertext') };
      } else {
        items.push({ keyId, ciphertext: r.ct, aad: messageAad(threadId, r.id) });
        at.push(i);
      }
    });
    if (items.length > 0) {
      const results = await this.requireKms().decryptBatch(items, ctx);
      results.forEach((res, j) => {
        // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
        const i = at[j]!;
        if (!res.ok) {
          // Availability is a property of the whole call, not of one message.
          if (res.error.status >= 500) throw res.error;
          out[i] = res;
        } else {
          // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
          out[i] = { ok: true, value: this.join(res.value, records[i]!.rest) };
        }
      });
    }
    return out;
  }

  /** Body of one message; throws its CodedError (e.g. DECRYPT_FAILED) on failure. */
  async open(
    keyId: string | null,
    threadId: string,
    record: MessageRecord,
    ctx: CallContext,
  ): Promise<unknown> {
    if (record.ct === undefined) return JSON.parse(record.plain ?? 'null');
    if (keyId === null) throw kmsError('KEY_NOT_FOUND', 'the thread has no DEK for this ciphertext');
    const plaintext = await this.requireKms().decrypt(keyId, record.ct, messageAad(threadId, record.id), ctx);
    return this.join(plaintext, record.rest);
  }

  private requireKms(): Kms {
    if (this.kms === null) throw kmsError('NOT_READY', 'encryption is off on this server');
    return this.kms;
  }

  /** Body → bytes to encrypt, and (field policy) the JSON of what stays readable. */
  private split(body: unknown): { plaintext: Buffer; rest?: string } {
    if (this.fields === null) return { plaintext: Buffer.from(JSON.stringify(body)) };
    const copy = structuredClone(body);
    const secrets: Secrets = [];
    for (const pattern of this.fields) takeMatches(copy, pattern, 0, [], secrets);
    return { plaintext: Buffer.from(JSON.stringify(secrets)), rest: JSON.stringify(copy) };
  }

  /**
   * split() for a body stored in plaintext before encryption was on: one the policy refuses (a
   * prototype key on a policy path) is encrypted whole rather than left readable or failing the job.
   */
  private splitStored(body: unknown): { plaintext: Buffer; rest?: string } {
    try {
      return this.split(body);
    } catch (err) {
      if ((err as CodedError).code !== 'INVALID_INPUT') throw err;
      return { plaintext: Buffer.from(JSON.stringify(body)) };
    }
  }

  private join(plaintext: Buffer, rest: string | undefined): unknown {
    const decoded: unknown = JSON.parse(plaintext.toString('utf8'));
    if (rest === undefined) return decoded;
    const body: unknown = JSON.parse(rest);
    const secrets = decoded as Secrets;
    // Last taken, first restored: with overlapping patterns (`meta.*.*, meta.*`) a later secret is
    // the container an earlier one was taken out of, so it has to be back before its contents.
    // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
    for (let i = secrets.length - 1; i >= 0; i--) putAt(body, secrets[i]![0], secrets[i]![1]);
    return body;
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Moves every value matching `pattern` (from step `depth`) out of `node` into `secrets`. Object keys
 * are deleted; array elements become null, so the indexes of their siblings do not shift.
 */
function takeMatches(
  node: unknown,
  pattern: readonly string[],
  depth: number,
  here: PathStep[],
  secrets: Secrets,
): void {
  // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
  const step = pattern[depth]!;
  const last = depth === pattern.length - 1;
  const visit = (container: Record<string, unknown> | unknown[], key: string | number) => {
    if (!Object.hasOwn(container, key)) return;
    const where = [...here, key];
    if (typeof key === 'string' && PROTOTYPE_KEYS.has(key)) {
      throw new UserError(
        'INVALID_INPUT',
        `body field "${['body', ...where].join('.')}" is under the encryption field policy, where ` +
          'the keys "__proto__", "constructor" and "prototype" are not allowed',
      );
    }
    const child = (container as Record<string | number, unknown>)[key];
    if (child === undefined) return;
    if (last) {
      secrets.push([where, child]);
      if (Array.isArray(container)) container[key as number] = null;
      else delete container[key as string];
    } else {
      takeMatches(child, pattern, depth + 1, where, secrets);
    }
  };
  if (Array.isArray(node)) {
    if (step === '*') for (let i = 0; i < node.length; i++) visit(node, i);
    else if (/^\d+$/.test(step)) visit(node, Number(step));
  } else if (isObject(node)) {
    if (step === '*') for (const key of Object.keys(node)) visit(node, key);
    else if (Object.hasOwn(node, step)) visit(node, step);
  }
}

/** Puts a secret back; walks own properties only, so an inherited value (a prototype) is never reached. */
function putAt(root: unknown, where: readonly PathStep[], value: unknown): void {
  let node = root;
  for (let i = 0; i < where.length - 1; i++) {
    // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
    if (typeof node !== 'object' || node === null || !Object.hasOwn(node, where[i]!)) return;
    // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
    node = (node as Record<string | number, unknown>)[where[i]!];
  }
  if (typeof node !== 'object' || node === null) return;
  // defineProperty, not assignment: a body key named "__proto__" must stay a plain own property.
  // biome-ignore lint/style/noNonNullAssertion: indexes within arrays of one entry per record, or a path with at least one step
  Object.defineProperty(node, where[where.length - 1]!, {
    value,
    writable: true,
    enumerable: true,
    configurable: true,
  });
}
