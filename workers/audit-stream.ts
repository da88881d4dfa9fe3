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
 * Signing per block instead of per line keeps the cost near 0.2 µs per line instead of ~3 µs,
 * and streams per worker let workers sign in parallel without sharing a chain head.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { AuditFields, VerifyAuditResult } from '../src/protocol.js';

const MAC_BYTES = 32;
const MAC_FIELD = ',"mac":"';
/** `,"mac":"` + 64 hex + `"}` */
const MAC_SUFFIX_LENGTH = MAC_FIELD.length + MAC_BYTES * 2 + 2;

export type Outcome = 'ok' | 'error';

/**
 * The part of a line that depends only on its fields (op, key, thread, KEK version, caller, ...),
 * as UTF-8. Ops of a task share their fields object, so this is rendered and encoded once per
 * object, not once per line.
 */
const fieldsBytes = new WeakMap<AuditFields, Buffer>();

function fieldsPart(fields: AuditFields): Buffer {
  let bytes = fieldsBytes.get(fields);
  if (bytes === undefined) {
    let text = `,"op":${JSON.stringify(fields.op)}`;
    if (fields.keyId !== undefined) text += `,"key_id":${JSON.stringify(fields.keyId)}`;
    if (fields.threadId !== undefined) text += `,"thread_id":${JSON.stringify(fields.threadId)}`;
    if (fields.kekVersion !== undefined) text += `,"kek_version":"${fields.kekVersion}"`;
    if (fields.caller !== undefined) text += `,"caller":${JSON.stringify(fields.caller)}`;
    if (fields.remote !== undefined) text += `,"remote":${JSON.stringify(fields.remote)}`;
    if (fields.detail !== undefined) text += `,"detail":${JSON.stringify(fields.detail)}`;
    bytes = Buffer.from(text, 'utf8');
    fieldsBytes.set(fields, bytes);
  }
  return bytes;
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
const CLOSE_LINE = 2; // `}\n`

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
  /** `{"v":1,"ts":"<ts>","s":"<id>","n":` for the last timestamp seen (one per task). */
  #prefixTs = '';
  #prefix = Buffer.alloc(0);

  constructor(auditKey: Buffer) {
    this.#key = auditKey;
  }

  /** The line `{"v":1,"ts":…,"s":…,"n":…,"outcome":…<fields>}` plus a newline. */
  add(fields: AuditFields, ts: string, outcome: Outcome, code: string | null): void {
    if (ts !== this.#prefixTs) {
      this.#prefixTs = ts;
      this.#prefix = Buffer.from(`{"v":1,"ts":"${ts}","s":"${this.id}","n":`, 'utf8');
    }
    const prefix = this.#prefix;
    const result = outcomePart(outcome, code);
    const rest = fieldsPart(fields);
    this.#ensure(prefix.length + MAX_SEQUENCE_DIGITS + result.length + rest.length + CLOSE_LINE);
    const block = this.#block;
    let at = this.#length;
    block.set(prefix, at);
    at = writeDecimal(block, at + prefix.length, this.#next++);
    block.set(result, at);
    at += result.length;
    block.set(rest, at);
    at += rest.length;
    block[at++] = 0x7d; // }
    block[at++] = 0x0a; // \n
    this.#length = at;
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
   * last line's final newline, before `mac` is added to it.
   */
  seal(): SealedBlock | null {
    const length = this.#length;
    if (length === 0) return null;
    this.#length = 0;
    const block = this.#block;
    const mac = createHmac('sha256', this.#key)
      .update(this.#prevMac)
      .update(block.subarray(0, length - 1))
      .digest();
    this.#prevMac = mac;
    // The last line's `}\n` becomes `,"mac":"<hex>"}\n`.
    let at = length - 2;
    at += block.write(MAC_FIELD, at, 'latin1');
    at += block.write(mac.toString('hex'), at, 'latin1');
    at += block.write('"}\n', at, 'latin1');
    return { buffer: block, length: at };
  }
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

interface StreamState {
  next: number;
  prevMac: Buffer;
  hmacInput: string[];
  firstLine: number;
}

/** Verifies a whole audit log; stops at the first bad line. */
export function verifyAuditFile(auditKey: Buffer, path: string): VerifyAuditResult {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    return {
      ok: false,
      linesVerified: 0,
      firstBadLine: null,
      reason: `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
    };
  }
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  const streams = new Map<string, StreamState>();
  const fail = (line: number, reason: string): VerifyAuditResult => ({
    ok: false,
    linesVerified: line - 1,
    firstBadLine: line,
    reason,
  });
  for (let i = 0; i < lines.length; i++) {
    const lineNo = i + 1;
    const line = lines[i]!;
    let record: { s?: unknown; n?: unknown; mac?: unknown };
    try {
      record = JSON.parse(line);
    } catch {
      return fail(lineNo, 'not a JSON line');
    }
    if (typeof record !== 'object' || record === null) return fail(lineNo, 'not an audit record');
    const { s, n, mac } = record;
    if (typeof s !== 'string' || typeof n !== 'number') return fail(lineNo, 'missing stream or sequence');
    let stream = streams.get(s);
    if (stream === undefined) {
      stream = { next: 0, prevMac: Buffer.alloc(MAC_BYTES), hmacInput: [], firstLine: lineNo };
      streams.set(s, stream);
    }
    if (n !== stream.next) {
      return fail(
        lineNo,
        `stream ${s}: expected line ${stream.next}, found ${n} (line deleted, inserted or moved)`,
      );
    }
    stream.next++;
    if (stream.hmacInput.length === 0) stream.firstLine = lineNo;
    if (mac === undefined) {
      stream.hmacInput.push(line);
      continue;
    }
    if (typeof mac !== 'string' || !line.endsWith('"}') || line.length < MAC_SUFFIX_LENGTH) {
      return fail(lineNo, 'malformed mac');
    }
    const signedLast = `${line.slice(0, line.length - MAC_SUFFIX_LENGTH)}}`;
    const expected = Buffer.from(mac, 'hex');
    const hmac = createHmac('sha256', auditKey).update(stream.prevMac);
    for (const part of stream.hmacInput) hmac.update(`${part}\n`);
    hmac.update(signedLast);
    const actual = hmac.digest();
    if (expected.length !== MAC_BYTES || !timingSafeEqual(actual, expected)) {
      return fail(stream.firstLine, `signature mismatch for lines ${stream.firstLine}-${lineNo}`);
    }
    stream.prevMac = actual;
    stream.hmacInput = [];
  }
  for (const [id, stream] of streams) {
    if (stream.hmacInput.length > 0) {
      return fail(stream.firstLine, `stream ${id}: unsigned lines from line ${stream.firstLine} to the end`);
    }
  }
  return { ok: true, linesVerified: lines.length, firstBadLine: null, reason: null };
}
