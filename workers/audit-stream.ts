/**
 * Signed, chained audit lines. Worker-only: the audit key is derived from the master key.
 *
 * Each worker writes its own stream (random id `s`). Every line carries its position `n` in that
 * stream, and the lines one task produces form a block whose last line carries
 * `mac = HMAC-SHA256(auditKey, previous block's mac ‖ the block's lines)`, each line taken without
 * its own `mac` field and joined by "\n". So:
 *  - an edited line breaks its block's MAC;
 *  - a deleted, inserted, duplicated or reordered line breaks the `n` sequence of its stream
 *    (found at that exact line) and the MAC chain;
 *  - unsigned lines at the end of a stream are reported too.
 * When the log rolls over to a new file, a stream's first line there carries `prev_mac`, the MAC
 * its chain goes on from, and its session link again: a verifier told that older files expired
 * starts the chain there.
 * With a signing key (src/audit-checkpoint.ts) the stream also chains a SHA-256 hash over its
 * blocks as written and appends a signed checkpoint every so many lines or seconds: a block of one
 * line, after the block that made it due, written with it. Hashing costs one digest per block;
 * signing (~50 µs) happens only at checkpoints.
 * Signing per block instead of per line keeps the cost near 0.2 µs per line instead of ~3 µs,
 * and streams per worker let workers sign in parallel without sharing a chain head.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { checkpointMessage, HASH_BYTES, type StreamCheckpoint } from '../src/audit-checkpoint.js';
import type { StreamHead } from '../src/audit-link.js';
import type { AuditFields } from '../src/worker-abi/index.js';
import type { AuditSigner } from './audit-signer.js';

export const MAC_BYTES = 32;
const MAC_FIELD = ',"mac":"';
/** `,"mac":"` + 64 hex + `"}` */
export const MAC_SUFFIX_LENGTH = MAC_FIELD.length + MAC_BYTES * 2 + 2;

export type Outcome = 'ok' | 'error';

/**
 * The part of a line that depends only on its fields (op, key, thread, KEK version, caller, ...),
 * as UTF-8. Ops of a task share their fields object, so this is rendered and encoded once per
 * object, not once per line.
 */
const fieldsBytes = new WeakMap<AuditFields, Buffer>();

export function fieldsPart(fields: AuditFields): Buffer {
  let bytes = fieldsBytes.get(fields);
  if (bytes === undefined) {
    let text = `,"op":${JSON.stringify(fields.op)}`;
    if (fields.keyId !== undefined) text += `,"key_id":${JSON.stringify(fields.keyId)}`;
    if (fields.threadId !== undefined) text += `,"thread_id":${JSON.stringify(fields.threadId)}`;
    if (fields.kekVersion !== undefined) text += `,"kek_version":"${fields.kekVersion}"`;
    if (fields.caller !== undefined) text += `,"caller":${JSON.stringify(fields.caller)}`;
    if (fields.remote !== undefined) text += `,"remote":${JSON.stringify(fields.remote)}`;
    if (fields.detail !== undefined) text += `,"detail":${JSON.stringify(fields.detail)}`;
    if (fields.heads !== undefined) text += `,"heads":${JSON.stringify(fields.heads)}`;
    bytes = Buffer.from(text, 'utf8');
    fieldsBytes.set(fields, bytes);
  }
  return bytes;
}

let isoMillis = 0;
let isoText = '';
/** The current time as ISO 8601, formatted at most once per millisecond. */
export function isoNow(): string {
  const now = Date.now();
  if (now !== isoMillis) {
    isoMillis = now;
    isoText = new Date(now).toISOString();
  }
  return isoText;
}

const OUTCOME_OK = Buffer.from(',"outcome":"ok"', 'latin1');
/** Error codes are a short fixed list (errors.ts), so their outcome parts are kept. */
const outcomeErrorBytes = new Map<string, Buffer>();

function outcomePart(outcome: Outcome, code: string | null): Buffer {
  if (outcome === 'ok' && code === null) return OUTCOME_OK;
  const key = `${outcome}/${code ?? ''}`;
  let bytes = outcomeErrorBytes.get(key);
  if (bytes === undefined) {
    const text = code === null ? `,"outcome":"${outcome}"` : `,"outcome":"${outcome}","code":"${code}"`;
    bytes = Buffer.from(text, 'utf8');
    outcomeErrorBytes.set(key, bytes);
  }
  return bytes;
}

/** Most bytes a line's sequence number takes in decimal (n < 2^53). */
const MAX_SEQUENCE_DIGITS = 16;
const NO_LINK = Buffer.alloc(0);
const COUNT_FIELD = Buffer.from(',"count":', 'latin1');
const CLOSE_LINE = 2; // `}\n`

/** When a stream with a signing key writes its checkpoints. */
export interface StreamCheckpoints {
  signer: AuditSigner;
  /** After this many lines that no checkpoint covers. */
  lines: number;
  /** Or once the first line that no checkpoint covers is this old (checked at each block). */
  ms: number;
}

/** A sealed block: the first `length` bytes of `buffer`, valid until the stream's next add(). */
export interface SealedBlock {
  buffer: Buffer;
  length: number;
}

export class AuditStream {
  readonly id = randomBytes(6).toString('hex');
  #key: Buffer;
  #next = 0;
  #prevMac = Buffer.alloc(MAC_BYTES);
  /**
   * The open block's lines, each ending `}\n`, written as bytes straight into this buffer, which is
   * reused from block to block and both hashed and written from. Building each line as a string
   * and encoding the block afterwards cost about as much as everything else the audit does.
   */
  #block = Buffer.allocUnsafeSlow(64 * 1024);
  #length = 0;
  /** `{"v":1,"ts":"<ts>",["replica":"<id>",]"s":"<id>","n":` for the last timestamp seen (one per task). */
  #prefixTs = '';
  #prefix = Buffer.alloc(0);
  /** Session link fields, appended to the stream's first line only (src/audit-link.ts). */
  readonly #link: Buffer;
  #macHex = '';
  #macN = -1;
  /** The next line is the stream's first in a new file: it names the MAC the chain goes on from. */
  #anchorNext = false;

  /** `"replica":"<id>",` when the KMS is a replica of a cluster, so a line says who wrote it. */
  readonly #replicaPart: string;

  readonly #checkpoints: StreamCheckpoints | null;
  /** The hash chain over every block written so far (with checkpoints only). */
  #hash = Buffer.alloc(HASH_BYTES);
  /** Lines in the open block, and lines written that no checkpoint covers yet. */
  #openLines = 0;
  #uncovered = 0;
  /** When the first line no checkpoint covers was written (ms). */
  #uncoveredSince = 0;
  #lastCheckpoint: StreamCheckpoint | null = null;

  constructor(
    auditKey: Buffer,
    link: string | null = null,
    replica: string | null = null,
    checkpoints: StreamCheckpoints | null = null,
  ) {
    this.#key = auditKey;
    // `ak` names the audit key, so that a verifier holding several (a re-keyed master key) knows
    // which one signed this stream, and a wrong one is told apart from tampering.
    this.#link = Buffer.from(`${link ?? ''},"ak":"${auditKeyId(auditKey)}"`, 'latin1');
    this.#replicaPart = replica === null ? '' : `"replica":${JSON.stringify(replica)},`;
    this.#checkpoints = checkpoints;
  }

  /** The last checkpoint written (what the registry keeps to see a cut tail); null before the first. */
  checkpoint(): StreamCheckpoint | null {
    return this.#lastCheckpoint;
  }

  /** The last signed block: what the main thread keeps in the registry. Null before the first. */
  head(): StreamHead | null {
    return this.#macHex === '' ? null : { s: this.id, n: this.#macN, mac: this.#macHex };
  }

  /** The next line opens a new file (rollover, reopen): it will carry `prev_mac`. */
  anchorNext(): void {
    this.#anchorNext = true;
  }

  /**
   * The line `{"v":1,"ts":…,["replica":…,]"s":…,"n":…,"outcome":…,["count":…,]<fields>}` plus a
   * newline. `count`: the line stands for that many operations (audit_data_ops: aggregate).
   */
  add(fields: AuditFields, ts: string, outcome: Outcome, code: string | null, count?: number): void {
    this.addPart(fieldsPart(fields), ts, outcome, code, count);
  }

  /** add() with the fields already rendered (fieldsPart), as a tally keeps them. */
  addPart(part: Buffer, ts: string, outcome: Outcome, code: string | null, count?: number): void {
    this.#write(ts, outcomePart(outcome, code), part, count);
  }

  #write(ts: string, result: Buffer, rest: Buffer, count?: number): void {
    if (ts !== this.#prefixTs) {
      this.#prefixTs = ts;
      this.#prefix = Buffer.from(`{"v":1,"ts":"${ts}",${this.#replicaPart}"s":"${this.id}","n":`, 'utf8');
    }
    const prefix = this.#prefix;
    let link = this.#next === 0 ? this.#link : NO_LINK;
    if (this.#anchorNext) {
      this.#anchorNext = false;
      // A first line has nothing to go on from: its session link (or nothing) is its anchor.
      // Later ones repeat the link, so that a chain starting in this file knows their session.
      // With checkpoints, the hash chain's value too: a verifier starting at this file takes
      // both chains up here.
      if (this.#next > 0) {
        const prevHash = this.#checkpoints === null ? '' : `,"prev_hash":"${this.#hash.toString('hex')}"`;
        const prevMac = Buffer.from(`,"prev_mac":"${this.#prevMac.toString('hex')}"${prevHash}`, 'latin1');
        link = Buffer.concat([this.#link, prevMac]);
      }
    }
    const countBytes = count === undefined ? 0 : COUNT_FIELD.length + MAX_SEQUENCE_DIGITS;
    this.#ensure(
      prefix.length +
        MAX_SEQUENCE_DIGITS +
        result.length +
        countBytes +
        rest.length +
        link.length +
        CLOSE_LINE,
    );
    const block = this.#block;
    let at = this.#length;
    block.set(prefix, at);
    at = writeDecimal(block, at + prefix.length, this.#next++);
    block.set(result, at);
    at += result.length;
    if (count !== undefined) {
      block.set(COUNT_FIELD, at);
      at = writeDecimal(block, at + COUNT_FIELD.length, count);
    }
    block.set(rest, at);
    at += rest.length;
    if (link.length > 0) {
      block.set(link, at);
      at += link.length;
    }
    block[at++] = 0x7d; // }
    block[at++] = 0x0a; // \n
    this.#length = at;
    this.#openLines++;
  }

  #ensure(bytes: number): void {
    // Room for the MAC suffix too, so seal() never has to grow the buffer.
    const needed = this.#length + bytes + MAC_SUFFIX_LENGTH;
    if (needed <= this.#block.length) return;
    const grown = Buffer.allocUnsafeSlow(Math.max(needed, this.#block.length * 2));
    this.#block.copy(grown, 0, 0, this.#length);
    this.#block = grown;
  }

  /**
   * Closes the open block: its bytes (lines newline-terminated, the last one signed), valid until
   * the next add(), or null if the block is empty. The MAC covers the block as written but for the
   * last line's final newline, before `mac` is added to it. With checkpoints, a checkpoint block
   * follows when one is due, or when `checkpoint` asks for one and some line is not yet covered
   * (before the stop line, after it, and when the main thread asks an idle worker).
   */
  seal(checkpoint = false): SealedBlock | null {
    let end = this.#length === 0 ? 0 : this.#sealFrom(0);
    const checkpoints = this.#checkpoints;
    if (checkpoints !== null && this.#uncovered > 0) {
      const now = Date.now();
      const due =
        checkpoint || this.#uncovered >= checkpoints.lines || now - this.#uncoveredSince >= checkpoints.ms;
      if (due) end = this.#addCheckpoint(end, checkpoints.signer, now);
    }
    this.#length = 0;
    return end === 0 ? null : { buffer: this.#block, length: end };
  }

  /** Signs the open lines from `start` on as one block; returns where the block now ends. */
  #sealFrom(start: number): number {
    const length = this.#length;
    const block = this.#block;
    const mac = createHmac('sha256', this.#key)
      .update(this.#prevMac)
      .update(block.subarray(start, length - 1))
      .digest();
    this.#prevMac = mac;
    this.#macHex = mac.toString('hex');
    this.#macN = this.#next - 1;
    // The last line's `}\n` becomes `,"mac":"<hex>"}\n`.
    let at = length - 2;
    at += block.write(MAC_FIELD, at, 'latin1');
    at += block.write(this.#macHex, at, 'latin1');
    at += block.write('"}\n', at, 'latin1');
    if (this.#checkpoints !== null) {
      this.#hash = createHash('sha256').update(this.#hash).update(block.subarray(start, at)).digest();
      if (this.#uncovered === 0) this.#uncoveredSince = Date.now();
      this.#uncovered += this.#openLines;
    }
    this.#openLines = 0;
    return at;
  }

  /** Appends a checkpoint block covering every line before it, after the sealed bytes up to `end`. */
  #addCheckpoint(end: number, signer: AuditSigner, now: number): number {
    const covers = this.#next - 1;
    const hashHex = this.#hash.toString('hex');
    const sig = signer.sign(checkpointMessage(this.id, covers, hashHex));
    const body =
      `,"op":"checkpoint","covers":${covers},"hash":"${hashHex}",` +
      `"signing_key":"${signer.keyId}","sig":"${sig}"`;
    this.#length = end;
    this.#write(new Date(now).toISOString(), OUTCOME_OK, Buffer.from(body, 'latin1'));
    const at = this.#sealFrom(end);
    // The checkpoint vouches for itself (signed); the next one covers it in the chain.
    this.#uncovered = 0;
    this.#lastCheckpoint = { s: this.id, n: covers, hash: hashHex };
    return at;
  }
}

const AUDIT_KEY_ID_LABEL = 'progressdb/audit-key-id/v1';

/** An audit key's fingerprint (16 hex digits): not secret, it names the key, revealing nothing. */
export function auditKeyId(auditKey: Buffer): string {
  return createHmac('sha256', auditKey).update(AUDIT_KEY_ID_LABEL).digest('hex').slice(0, 16);
}

/** Writes `n` (a non-negative safe integer) in decimal at `at`; returns the position after it. */
function writeDecimal(out: Buffer, at: number, n: number): number {
  let digits = 1;
  for (let rest = n; rest >= 10; rest = Math.floor(rest / 10)) digits++;
  let rest = n;
  for (let i = at + digits - 1; i >= at; i--) {
    out[i] = 0x30 + (rest % 10);
    rest = Math.floor(rest / 10);
  }
  return at + digits;
}
