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
import { type AuditHeadRecord, parseHeads, type SessionClaim, type StreamHead } from '../src/audit-link.js';
import type { AuditFields, VerifyAuditResult } from '../src/worker-abi/index.js';

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
    if (fields.heads !== undefined) text += `,"heads":${JSON.stringify(fields.heads)}`;
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
const NO_LINK = Buffer.alloc(0);
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
  /** Session link fields, appended to the stream's first line only (src/audit-link.ts). */
  readonly #link: Buffer;
  #macHex = '';
  #macN = -1;

  constructor(auditKey: Buffer, link: string | null = null) {
    this.#key = auditKey;
    this.#link = Buffer.from(link ?? '', 'latin1');
  }

  /** The last signed block: what the main thread keeps in the registry. Null before the first. */
  head(): StreamHead | null {
    return this.#macHex === '' ? null : { s: this.id, n: this.#macN, mac: this.#macHex };
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
    const link = this.#next === 0 ? this.#link : NO_LINK;
    this.#ensure(
      prefix.length + MAX_SEQUENCE_DIGITS + result.length + rest.length + link.length + CLOSE_LINE,
    );
    const block = this.#block;
    let at = this.#length;
    block.set(prefix, at);
    at = writeDecimal(block, at + prefix.length, this.#next++);
    block.set(result, at);
    at += result.length;
    block.set(rest, at);
    at += rest.length;
    if (link.length > 0) {
      block.set(link, at);
      at += link.length;
    }
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
    this.#macHex = mac.toString('hex');
    this.#macN = this.#next - 1;
    // The last line's `}\n` becomes `,"mac":"<hex>"}\n`.
    let at = length - 2;
    at += block.write(MAC_FIELD, at, 'latin1');
    at += block.write(this.#macHex, at, 'latin1');
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
  /** Its session; null for a stream written before streams were linked (an older version). */
  session: SessionState | null;
  /** `n` and MAC (hex) of its last signed line; -1 and '' before the first. */
  lastN: number;
  lastMac: string;
  /** MACs of earlier signed points that some link or the registry names (see namedPoints). */
  points: Map<number, string>;
}

interface StopState {
  line: number;
  s: string;
  n: number;
  /** The stop's own stream's last signed point before the stop line. */
  before: { n: number; mac: string };
  heads: Map<string, StreamHead>;
}

interface SessionState {
  number: number;
  /** Its link fields as text: every stream of the session must carry the same. */
  link: string;
  streams: Map<string, StreamState>;
  stop: StopState | null;
}

class Failure {
  constructor(
    readonly line: number | null,
    readonly reason: string,
  ) {}
}

const DECIMAL = /^(0|[1-9][0-9]{0,15})$/;

function decimal(value: unknown): number | null {
  return typeof value === 'string' && DECIMAL.test(value) ? Number(value) : null;
}

/**
 * `s:n` of every point a link or the registry names. Links can name a point before a stream's end
 * (after an unclean stop the saved head lags the log), and keeping every block's MAC of a large log
 * to check them would cost memory: this first pass finds the few that are needed.
 */
function namedPoints(lines: readonly string[], head: AuditHeadRecord | null): Set<string> {
  const points = new Set<string>();
  const add = (heads: readonly StreamHead[] | null | undefined) => {
    for (const h of heads ?? []) points.add(`${h.s}:${h.n}`);
  };
  for (const line of lines) {
    // Field values are JSON-escaped, so this text only ever occurs as the field itself.
    if (!line.includes('"prev_heads":"')) continue;
    try {
      add(parseHeads((JSON.parse(line) as { prev_heads?: unknown }).prev_heads));
    } catch {
      // Reported by the main pass.
    }
  }
  add(head?.heads);
  add(head?.links?.heads);
  return points;
}

/** Why `claim` does not match the sessions read so far, or null if it does. */
function checkClaim(claim: SessionClaim, sessions: Map<number, SessionState>): string | null {
  const target = sessions.get(claim.session);
  if (target === undefined) return `session ${claim.session} is not in the log (session removed or moved)`;
  for (const head of claim.heads) {
    const stream = target.streams.get(head.s);
    const where = `stream ${head.s} of session ${claim.session}`;
    if (stream === undefined) return `${where} is not in the log (stream removed)`;
    const mac = head.n === stream.lastN ? stream.lastMac : stream.points.get(head.n);
    if (mac !== head.mac) return `${where} does not reach its recorded line ${head.n} (lines removed)`;
    if (claim.sealed && head.n !== stream.lastN) return `${where} goes on after its sealed end`;
  }
  if (claim.sealed) {
    if (claim.heads.length !== target.streams.size) {
      return `session ${claim.session} was sealed with ${claim.heads.length} streams, the log has ${target.streams.size}`;
    }
    if (target.stop === null)
      return `session ${claim.session} was sealed, but its stop line is not in the log`;
  }
  return null;
}

/** A session's stop line must name every other stream at its end and be its own stream's last. */
function checkStop(session: SessionState): void {
  const stop = session.stop;
  if (stop === null) return;
  for (const [id, stream] of session.streams) {
    if (id === stop.s) {
      if (stream.lastN !== stop.n)
        throw new Failure(stop.line, 'the stop line is not the last of its stream');
      continue;
    }
    const named = stop.heads.get(id);
    if (named === undefined || named.n !== stream.lastN || named.mac !== stream.lastMac) {
      throw new Failure(stop.line, `the stop line does not seal stream ${id} at its end (lines removed?)`);
    }
  }
  for (const id of stop.heads.keys()) {
    if (!session.streams.has(id)) {
      throw new Failure(
        stop.line,
        `the stop line names stream ${id}, which is not in the log (stream removed)`,
      );
    }
  }
  const own = stop.heads.get(stop.s);
  if (own === undefined ? stop.before.n !== -1 : own.n !== stop.before.n || own.mac !== stop.before.mac) {
    throw new Failure(stop.line, 'the stop line does not seal its own stream');
  }
}

interface LinkRecord {
  session?: unknown;
  prev_session?: unknown;
  prev_sealed?: unknown;
  prev_heads?: unknown;
}

/**
 * Verifies a whole audit log; stops at the first bad line. `head` is the registry's audit head:
 * the sessions must form one chain of links, and the log's end must reach that head.
 */
export function verifyAuditFile(
  auditKey: Buffer,
  path: string,
  head: AuditHeadRecord | null = null,
): VerifyAuditResult {
  const claim = head === null ? null : head.heads.length > 0 ? { ...head } : head.links;
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    const recorded = claim === null ? '' : `, but the registry records lines up to session ${claim.session}`;
    return {
      ok: false,
      linesVerified: 0,
      firstBadLine: null,
      reason: `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? 'error'}${recorded}`,
    };
  }
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  try {
    verifyLines(auditKey, lines, head, claim);
  } catch (err) {
    if (!(err instanceof Failure)) throw err;
    return {
      ok: false,
      linesVerified: err.line === null ? lines.length : err.line - 1,
      firstBadLine: err.line,
      reason: err.reason,
    };
  }
  return { ok: true, linesVerified: lines.length, firstBadLine: null, reason: null };
}

function verifyLines(
  auditKey: Buffer,
  lines: readonly string[],
  head: AuditHeadRecord | null,
  claim: SessionClaim | null,
): void {
  const named = namedPoints(lines, head);
  const streams = new Map<string, StreamState>();
  const sessions = new Map<number, SessionState>();
  let current: SessionState | null = null;

  /**
   * A new stream's first line: it joins its session, or begins the next one (checking its link).
   * Returns the session now current.
   */
  const join = (
    lineNo: number,
    s: string,
    stream: StreamState,
    record: LinkRecord,
    current: SessionState | null,
  ): SessionState | null => {
    if (record.session === undefined) {
      if (current !== null) throw new Failure(lineNo, `stream ${s} does not begin with a session link`);
      return null;
    }
    const number = decimal(record.session);
    const prev = decimal(record.prev_session);
    const heads = parseHeads(record.prev_heads);
    const sealed = record.prev_sealed;
    if (number === null || prev === null || heads === null || (sealed !== 'true' && sealed !== 'false')) {
      throw new Failure(lineNo, 'malformed session link');
    }
    const link = `${prev}|${sealed}|${record.prev_heads as string}`;
    if (current !== null && number === current.number) {
      if (link !== current.link) {
        throw new Failure(lineNo, `stream ${s} links session ${number} unlike its other streams`);
      }
    } else {
      if (current !== null) {
        if (number < current.number) {
          throw new Failure(
            lineNo,
            `session ${number} begins after session ${current.number} (sessions moved)`,
          );
        }
        checkStop(current);
      }
      if (prev === 0) {
        if (current !== null) {
          throw new Failure(
            lineNo,
            `session ${number} links to no session, but session ${current.number} precedes it`,
          );
        }
      } else {
        const reason =
          prev < number
            ? checkClaim({ session: prev, sealed: sealed === 'true', heads }, sessions)
            : 'malformed';
        if (reason !== null) throw new Failure(lineNo, `the link of session ${number}: ${reason}`);
      }
      current = { number, link, streams: new Map(), stop: null };
      sessions.set(number, current);
    }
    stream.session = current;
    current.streams.set(s, stream);
    return current;
  };

  for (let i = 0; i < lines.length; i++) {
    const lineNo = i + 1;
    const line = lines[i]!;
    let record: LinkRecord & { s?: unknown; n?: unknown; mac?: unknown; op?: unknown; heads?: unknown };
    try {
      record = JSON.parse(line);
    } catch {
      throw new Failure(lineNo, 'not a JSON line');
    }
    if (typeof record !== 'object' || record === null) throw new Failure(lineNo, 'not an audit record');
    const { s, n, mac } = record;
    if (typeof s !== 'string' || typeof n !== 'number')
      throw new Failure(lineNo, 'missing stream or sequence');
    let stream = streams.get(s);
    const isNew = stream === undefined;
    if (stream === undefined) {
      stream = {
        next: 0,
        prevMac: Buffer.alloc(MAC_BYTES),
        hmacInput: [],
        firstLine: lineNo,
        session: null,
        lastN: -1,
        lastMac: '',
        points: new Map(),
      };
      streams.set(s, stream);
    }
    if (n !== stream.next) {
      throw new Failure(
        lineNo,
        `stream ${s}: expected line ${stream.next}, found ${n} (line deleted, inserted or moved)`,
      );
    }
    if (isNew) current = join(lineNo, s, stream, record, current);
    else if (stream.session !== current) {
      throw new Failure(lineNo, `stream ${s} goes on after a later session began (lines moved)`);
    }
    if (record.op === 'stop' && record.heads !== undefined && stream.session !== null) {
      const heads = parseHeads(record.heads);
      if (heads === null) throw new Failure(lineNo, 'malformed stop line');
      if (stream.session.stop !== null) throw new Failure(lineNo, 'a second stop line in one session');
      stream.session.stop = {
        line: lineNo,
        s,
        n,
        before: { n: stream.lastN, mac: stream.lastMac },
        heads: new Map(heads.map((h) => [h.s, h])),
      };
    }
    stream.next++;
    if (stream.hmacInput.length === 0) stream.firstLine = lineNo;
    if (mac === undefined) {
      stream.hmacInput.push(line);
      continue;
    }
    if (typeof mac !== 'string' || !line.endsWith('"}') || line.length < MAC_SUFFIX_LENGTH) {
      throw new Failure(lineNo, 'malformed mac');
    }
    const signedLast = `${line.slice(0, line.length - MAC_SUFFIX_LENGTH)}}`;
    const expected = Buffer.from(mac, 'hex');
    const hmac = createHmac('sha256', auditKey).update(stream.prevMac);
    for (const part of stream.hmacInput) hmac.update(`${part}\n`);
    hmac.update(signedLast);
    const actual = hmac.digest();
    if (expected.length !== MAC_BYTES || !timingSafeEqual(actual, expected)) {
      throw new Failure(stream.firstLine, `signature mismatch for lines ${stream.firstLine}-${lineNo}`);
    }
    stream.prevMac = actual;
    stream.hmacInput = [];
    stream.lastN = n;
    stream.lastMac = mac;
    if (named.size > 0 && named.has(`${s}:${n}`)) stream.points.set(n, mac);
  }
  for (const [id, stream] of streams) {
    if (stream.hmacInput.length > 0) {
      throw new Failure(
        stream.firstLine,
        `stream ${id}: unsigned lines from line ${stream.firstLine} to the end`,
      );
    }
  }
  if (current !== null) checkStop(current);
  // Without the registry (an archived copy of the log) the chain is checked, but not its end.
  if (head === null) return;
  if (current !== null && current.number > head.session) {
    throw new Failure(
      null,
      `the log has session ${current.number}, the registry only ${head.session} (registry rolled back?)`,
    );
  }
  if (claim === null) return;
  if (lines.length === 0) {
    throw new Failure(
      null,
      `the log is empty, but the registry records lines up to session ${claim.session}`,
    );
  }
  const reason = checkClaim(claim, sessions);
  if (reason !== null)
    throw new Failure(null, `the end of the log does not reach the registry's head: ${reason}`);
}
