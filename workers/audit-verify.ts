/**
 * The audit log verifier (worker-only: it needs the audit key). See audit-stream.ts for the line
 * format. It reads the whole log once, checking per stream the sequence `n` and each block's MAC
 * chain, and per session that the streams link to the session before and that a stop line seals
 * every stream at its end; with the registry's audit head it also checks that the log reaches
 * the head, so lines cut from the end are found too.
 *
 * A rolled log is one chain over several files (oldest first, the live file last): each stream
 * simply goes on in the next file. When the oldest files were removed on purpose (expiry), the
 * chain may start at a later file (`trimmed`): each stream found there already running is taken
 * up from the `prev_mac` its first line in that file carries, and the session running there is
 * taken up with it; everything from there on is checked as usual.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { type AuditHeadRecord, parseHeads, type SessionClaim, type StreamHead } from '../src/audit-link.js';
import { MAC_BYTES, MAC_SUFFIX_LENGTH } from './audit-stream.js';

interface StreamState {
  /** The audit key that signs it: named by its first line's `ak`, or found at its first block. */
  key: Buffer | null;
  next: number;
  prevMac: Buffer;
  hmacInput: string[];
  firstLine: number;
  /** Its first line's `n`: 0, or where a trimmed chain took it up. */
  firstN: number;
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
  /** `n` of a checkpoint right after the stop line in its stream (audit signing on), or -1. */
  checkpointN: number;
}

interface SessionState {
  number: number;
  /** Taken up by a trimmed chain: streams and points in the removed files are not in the log. */
  partial: boolean;
  /** Its link fields as text: every stream of the session must carry the same. */
  link: string;
  streams: Map<string, StreamState>;
  stop: StopState | null;
}

export class Failure {
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
export function namedPoints(lines: readonly string[], head: AuditHeadRecord | null): Set<string> {
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
    // A taken-up session's stream may have ended in a removed file, or the point be in one.
    if (target.partial && (stream === undefined || head.n < stream.firstN - 1)) continue;
    if (stream === undefined) return `${where} is not in the log (stream removed)`;
    const mac = head.n === stream.lastN ? stream.lastMac : stream.points.get(head.n);
    if (mac !== head.mac) return `${where} does not reach its recorded line ${head.n} (lines removed)`;
    if (claim.sealed && head.n !== stream.lastN) return `${where} goes on after its sealed end`;
  }
  if (claim.sealed) {
    if (!target.partial && claim.heads.length !== target.streams.size) {
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
      // A checkpoint written with the stop line may follow it: it only signs what came before.
      if (stream.lastN !== stop.n && stream.lastN !== stop.checkpointN)
        throw new Failure(stop.line, 'the stop line is not the last of its stream');
      continue;
    }
    const named = stop.heads.get(id);
    if (named === undefined || named.n !== stream.lastN || named.mac !== stream.lastMac) {
      throw new Failure(stop.line, `the stop line does not seal stream ${id} at its end (lines removed?)`);
    }
  }
  for (const id of stop.heads.keys()) {
    if (!session.streams.has(id) && !session.partial) {
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

/** One audit line as parsed: the fields the verifier reads. */
type AuditLine = LinkRecord & {
  s?: unknown;
  n?: unknown;
  mac?: unknown;
  op?: unknown;
  heads?: unknown;
  prev_mac?: unknown;
};

const MAC_HEX = /^[0-9a-f]{64}$/;

function newStream(lineNo: number): StreamState {
  return {
    key: null,
    next: 0,
    prevMac: Buffer.alloc(MAC_BYTES),
    hmacInput: [],
    firstLine: lineNo,
    firstN: 0,
    session: null,
    lastN: -1,
    lastMac: '',
    points: new Map(),
  };
}

function parseLine(lineNo: number, line: string): AuditLine & { s: string; n: number } {
  let record: AuditLine;
  try {
    record = JSON.parse(line);
  } catch {
    throw new Failure(lineNo, 'not a JSON line');
  }
  if (typeof record !== 'object' || record === null) throw new Failure(lineNo, 'not an audit record');
  if (typeof record.s !== 'string' || typeof record.n !== 'number') {
    throw new Failure(lineNo, 'missing stream or sequence');
  }
  return record as AuditLine & { s: string; n: number };
}

/** A stream's session link (`session`, `prev_session`, `prev_sealed`, `prev_heads`), checked. */
function parseLink(lineNo: number, record: LinkRecord) {
  const number = decimal(record.session);
  const prev = decimal(record.prev_session);
  const heads = parseHeads(record.prev_heads);
  const sealed = record.prev_sealed;
  if (number === null || prev === null || heads === null || (sealed !== 'true' && sealed !== 'false')) {
    throw new Failure(lineNo, 'malformed session link');
  }
  return {
    number,
    prev,
    sealed: sealed === 'true',
    heads,
    link: `${prev}|${sealed}|${record.prev_heads as string}`,
  };
}

/** One pass over a log's lines, in order; throws a Failure at the first bad one. */
export class LogVerifier {
  readonly #streams = new Map<string, StreamState>();
  readonly #sessions = new Map<number, SessionState>();
  #current: SessionState | null = null;

  constructor(
    /** Every audit key the log may be signed with, by id (one per master key it was re-keyed from). */
    private readonly auditKeys: ReadonlyMap<string, Buffer>,
    /** `s:n` of the points that links or the registry name (namedPoints). */
    private readonly named: Set<string>,
    /** The chain starts after removed files: running streams are taken up (#takeUp). */
    private readonly trimmed = false,
  ) {}

  line(lineNo: number, line: string): void {
    const record = parseLine(lineNo, line);
    const { s, n } = record;
    let stream = this.#streams.get(s);
    const isNew = stream === undefined;
    if (stream === undefined) {
      stream = newStream(lineNo);
      this.#streams.set(s, stream);
    }
    const takenUp = isNew && n !== 0 && this.trimmed;
    if (takenUp) this.#takeUp(lineNo, stream, record);
    else if (n !== stream.next) {
      const hint = isNew ? '; or the oldest files were removed: see --from' : '';
      throw new Failure(
        lineNo,
        `stream ${s}: expected line ${stream.next}, found ${n} (line deleted, inserted or moved${hint})`,
      );
    }
    if (isNew) this.#keyOf(lineNo, stream, record);
    if (isNew && !takenUp) this.#join(lineNo, s, stream, record);
    else if (stream.session !== this.#current) {
      throw new Failure(lineNo, `stream ${s} goes on after a later session began (lines moved)`);
    }
    if (record.op === 'stop' && record.heads !== undefined && stream.session !== null) {
      this.#stopLine(lineNo, stream, record);
    }
    const stop = stream.session?.stop;
    if (record.op === 'checkpoint' && stop?.s === s && n === stop.n + 1) stop.checkpointN = n;
    stream.next++;
    if (stream.hmacInput.length === 0) stream.firstLine = lineNo;
    if (record.mac === undefined) stream.hmacInput.push(line);
    else this.#signedLine(lineNo, line, stream, record);
  }

  /** The key a stream's first line names (`ak`); streams written before `ak` existed name none. */
  #keyOf(lineNo: number, stream: StreamState, record: AuditLine & { s: string; n: number }): void {
    const id = (record as { ak?: unknown }).ak;
    if (id === undefined) return;
    const key = typeof id === 'string' ? this.auditKeys.get(id) : undefined;
    if (key === undefined) {
      throw new Failure(
        lineNo,
        `stream ${record.s} is signed with audit key ${String(id)}, which this master key does not know ` +
          '(wrong master key, or a registry without the audit keys of a re-key)',
      );
    }
    stream.key = key;
  }

  /**
   * A trimmed chain's first line of a stream already running: its `prev_mac` (signed with the
   * line) is where its chain goes on from, and its session link (repeated there) names its
   * session, which the chain takes up as partial: some of its lines are in the removed files.
   */
  #takeUp(lineNo: number, stream: StreamState, record: AuditLine & { s: string; n: number }): void {
    const { s, n, prev_mac: prevMac } = record;
    if (typeof prevMac !== 'string' || !MAC_HEX.test(prevMac)) {
      throw new Failure(
        lineNo,
        `stream ${s} begins at line ${n} without the prev_mac a new file starts with`,
      );
    }
    const { number, link } = parseLink(lineNo, record);
    let session = this.#current;
    if (session === null) {
      session = { number, partial: true, link, streams: new Map(), stop: null };
      this.#sessions.set(number, session);
      this.#current = session;
    } else if (session.number !== number) {
      throw new Failure(lineNo, `stream ${s} goes on after a later session began (lines moved)`);
    } else if (session.link !== link) {
      throw new Failure(lineNo, `stream ${s} links session ${number} unlike its other streams`);
    }
    session.partial = true;
    stream.next = n;
    stream.firstN = n;
    stream.prevMac = Buffer.from(prevMac, 'hex');
    stream.lastN = n - 1;
    stream.lastMac = prevMac;
    stream.points.set(n - 1, prevMac);
    stream.session = session;
    session.streams.set(s, stream);
  }

  /**
   * A new stream's first line: it joins the current session, or begins the next one (checking
   * its link to the session before).
   */
  #join(lineNo: number, s: string, stream: StreamState, record: LinkRecord): void {
    const current = this.#current;
    if (record.session === undefined) {
      if (current !== null) throw new Failure(lineNo, `stream ${s} does not begin with a session link`);
      return;
    }
    const { number, prev, sealed, heads, link } = parseLink(lineNo, record);
    let session = current;
    if (current !== null && number === current.number) {
      if (link !== current.link) {
        throw new Failure(lineNo, `stream ${s} links session ${number} unlike its other streams`);
      }
    } else {
      this.#checkLink(lineNo, number, prev, { session: prev, sealed, heads });
      session = { number, partial: false, link, streams: new Map(), stop: null };
      this.#sessions.set(number, session);
      this.#current = session;
    }
    stream.session = session;
    session?.streams.set(s, stream);
  }

  /** Session `number` begins, linking to session `prev` (0: none) at `claim`. */
  #checkLink(lineNo: number, number: number, prev: number, claim: SessionClaim): void {
    const current = this.#current;
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
      return;
    }
    // A trimmed chain that starts with this session: what it links to is in the removed files.
    if (this.trimmed && current === null && !this.#sessions.has(prev)) return;
    const reason = prev < number ? checkClaim(claim, this.#sessions) : 'malformed';
    if (reason !== null) throw new Failure(lineNo, `the link of session ${number}: ${reason}`);
  }

  #stopLine(lineNo: number, stream: StreamState, record: AuditLine & { s: string; n: number }): void {
    const session = stream.session as SessionState;
    const heads = parseHeads(record.heads);
    if (heads === null) throw new Failure(lineNo, 'malformed stop line');
    if (session.stop !== null) throw new Failure(lineNo, 'a second stop line in one session');
    session.stop = {
      line: lineNo,
      s: record.s,
      n: record.n,
      before: { n: stream.lastN, mac: stream.lastMac },
      heads: new Map(heads.map((h) => [h.s, h])),
      checkpointN: -1,
    };
  }

  /** The last line of a block: its MAC covers the previous MAC and the block's lines. */
  #signedLine(
    lineNo: number,
    line: string,
    stream: StreamState,
    record: AuditLine & { s: string; n: number },
  ): void {
    const { mac } = record;
    if (typeof mac !== 'string' || !line.endsWith('"}') || line.length < MAC_SUFFIX_LENGTH) {
      throw new Failure(lineNo, 'malformed mac');
    }
    const signedLast = `${line.slice(0, line.length - MAC_SUFFIX_LENGTH)}}`;
    const expected = Buffer.from(mac, 'hex');
    const macUnder = (key: Buffer) => {
      const hmac = createHmac('sha256', key).update(stream.prevMac);
      for (const part of stream.hmacInput) hmac.update(`${part}\n`);
      return hmac.update(signedLast).digest();
    };
    const matches = (actual: Buffer) => expected.length === MAC_BYTES && timingSafeEqual(actual, expected);
    let actual: Buffer | undefined;
    if (stream.key !== null) actual = macUnder(stream.key);
    else {
      // A stream that names no key (written before `ak`): whichever known key signs its first block.
      for (const key of this.auditKeys.values()) {
        actual = macUnder(key);
        if (matches(actual)) {
          stream.key = key;
          break;
        }
      }
    }
    if (actual === undefined || !matches(actual)) {
      throw new Failure(stream.firstLine, `signature mismatch for lines ${stream.firstLine}-${lineNo}`);
    }
    stream.prevMac = actual;
    stream.hmacInput = [];
    stream.lastN = record.n;
    stream.lastMac = mac;
    if (this.named.size > 0 && this.named.has(`${record.s}:${record.n}`)) stream.points.set(record.n, mac);
  }

  /**
   * After the last line: no stream may end unsigned, the last session's stop must hold, and with
   * the registry's head the log must reach it.
   */
  end(lineCount: number, head: AuditHeadRecord | null, claim: SessionClaim | null): void {
    for (const [id, stream] of this.#streams) {
      if (stream.hmacInput.length > 0) {
        throw new Failure(
          stream.firstLine,
          `stream ${id}: unsigned lines from line ${stream.firstLine} to the end`,
        );
      }
    }
    const current = this.#current;
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
    if (lineCount === 0) {
      throw new Failure(
        null,
        `the log is empty, but the registry records lines up to session ${claim.session}`,
      );
    }
    const reason = checkClaim(claim, this.#sessions);
    if (reason !== null)
      throw new Failure(null, `the end of the log does not reach the registry's head: ${reason}`);
  }
}
