/**
 * Verifies the audit log with the audit signing key's public key alone: no master key, no worker
 * (see src/audit-checkpoint.ts for what a checkpoint signs). Per stream it recomputes the hash
 * chain over the blocks as written and checks each checkpoint's hash and signature; with the
 * registry's audit head it also checks that the log still holds the last checkpoint the registry
 * recorded for each stream, so blocks cut off the end are found. Lines after a stream's last
 * checkpoint are not covered yet: counted and reported, not an error. Rolled files form one
 * chain, as for the MAC verifier; with `trimmed` (audit verify --from) a stream already running in
 * the first file is taken up from the `prev_hash` its first line there carries.
 */
import { createHash, createPublicKey, type Hash, type KeyObject, verify } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { checkpointMessage, publicKeyDer, type StreamCheckpoint, signingKeyId } from '../audit-checkpoint.js';
import { type AuditHeadRecord, recordedCheckpoints } from '../audit-link.js';

/** What went wrong: lines changed, a key other than the one given, or the end cut off. */
export type PublicVerifyProblem = 'tampered' | 'wrong-key' | 'truncated' | 'no-checkpoints' | 'unreadable';

export interface PublicVerifyResult {
  ok: boolean;
  problem: PublicVerifyProblem | null;
  /** Lines read. */
  lines: number;
  /** Lines some valid checkpoint covers (checkpoints included). */
  linesCovered: number;
  /** Lines after their stream's last checkpoint: not yet covered, so not checked. */
  linesUncovered: number;
  checkpoints: number;
  /** The bad line's file and number in it (1-based), when the problem is at a line. */
  file: string | null;
  line: number | null;
  reason: string | null;
}

class Problem {
  constructor(
    readonly kind: PublicVerifyProblem,
    readonly line: number | null,
    readonly reason: string,
  ) {}
}

interface StreamState {
  next: number;
  /** The hash chain's value after the last complete block; null: not tracked (see #takeUp). */
  hash: Buffer | null;
  /** The open block's hash, until its signed last line. */
  open: Hash | null;
  /** Where the lines since the last checkpoint start (the checkpoint itself, or the first line). */
  rangeStart: number;
  uncovered: number;
  /** Every valid checkpoint: the `n` it covers up to → its hash. */
  checkpoints: Map<number, string>;
  lastCovers: number;
  firstN: number;
}

interface Line {
  s?: unknown;
  n?: unknown;
  mac?: unknown;
  op?: unknown;
  covers?: unknown;
  hash?: unknown;
  signing_key?: unknown;
  sig?: unknown;
  prev_hash?: unknown;
}

const HEX64 = /^[0-9a-f]{64}$/;
const HEX128 = /^[0-9a-f]{128}$/;
const NEWLINE = Buffer.from('\n');

/** One pass over the chain's lines in order; throws a Problem at the first bad one. */
class PublicLogVerifier {
  readonly #keys = new Map<string, KeyObject>();
  readonly streams = new Map<string, StreamState>();
  covered = 0;
  checkpoints = 0;

  constructor(
    publicKeys: readonly Uint8Array[],
    private readonly trimmed: boolean,
  ) {
    for (const key of publicKeys) {
      this.#keys.set(
        signingKeyId(key),
        createPublicKey({ key: publicKeyDer(key), format: 'der', type: 'spki' }),
      );
    }
  }

  line(lineNo: number, bytes: Buffer): void {
    let record: Line;
    try {
      record = JSON.parse(bytes.toString('utf8'));
    } catch {
      throw new Problem('tampered', lineNo, 'not a JSON line');
    }
    const { s, n } = record ?? {};
    if (typeof s !== 'string' || typeof n !== 'number') {
      throw new Problem('tampered', lineNo, 'missing stream or sequence');
    }
    const stream = this.#stream(lineNo, s, n, record);
    if (n !== stream.next) {
      throw new Problem(
        'tampered',
        lineNo,
        `stream ${s}: expected line ${stream.next}, found ${n} (line deleted, inserted or moved)`,
      );
    }
    stream.next++;
    if (record.op === 'checkpoint') this.#checkpoint(lineNo, s, n, stream, record);
    else stream.uncovered++;
    if (stream.hash === null) return;
    stream.open ??= createHash('sha256').update(stream.hash);
    stream.open.update(bytes).update(NEWLINE);
    if (record.mac !== undefined) {
      stream.hash = stream.open.digest();
      stream.open = null;
    }
  }

  #stream(lineNo: number, s: string, n: number, record: Line): StreamState {
    const known = this.streams.get(s);
    if (known !== undefined) return known;
    const stream: StreamState = {
      next: 0,
      hash: Buffer.alloc(32),
      open: null,
      rangeStart: lineNo,
      uncovered: 0,
      checkpoints: new Map(),
      lastCovers: -1,
      firstN: n,
    };
    if (n !== 0 && this.trimmed) {
      // Taken up in a later file: its chain goes on from the hash its first line there names;
      // a stream written without a signing key names none and is simply not covered.
      stream.next = n;
      stream.hash =
        typeof record.prev_hash === 'string' && HEX64.test(record.prev_hash)
          ? Buffer.from(record.prev_hash, 'hex')
          : null;
    }
    this.streams.set(s, stream);
    return stream;
  }

  #checkpoint(lineNo: number, s: string, n: number, stream: StreamState, record: Line): void {
    const { covers, hash, signing_key: keyId, sig } = record;
    if (
      covers !== n - 1 ||
      typeof hash !== 'string' ||
      !HEX64.test(hash) ||
      typeof keyId !== 'string' ||
      typeof sig !== 'string' ||
      !HEX128.test(sig)
    ) {
      throw new Problem('tampered', lineNo, `stream ${s}: malformed checkpoint`);
    }
    if (stream.hash === null || stream.open !== null) {
      throw new Problem('tampered', lineNo, `stream ${s}: a checkpoint where none can be (lines moved?)`);
    }
    if (hash !== stream.hash.toString('hex')) {
      throw new Problem(
        'tampered',
        stream.rangeStart,
        `stream ${s}: lines ${stream.rangeStart} to ${lineNo - 1} do not match the checkpoint at line ` +
          `${lineNo} (a line in that range was altered, deleted or inserted)`,
      );
    }
    const key = this.#keys.get(keyId);
    if (key === undefined) {
      throw new Problem(
        'wrong-key',
        lineNo,
        `the checkpoint is signed by key ${keyId}; the public key given is ${[...this.#keys.keys()].join(', ')}`,
      );
    }
    if (!verify(null, checkpointMessage(s, covers, hash), key, Buffer.from(sig, 'hex'))) {
      throw new Problem(
        'tampered',
        lineNo,
        `stream ${s}: the checkpoint's signature does not verify under its key ${keyId} (the checkpoint was altered or forged)`,
      );
    }
    this.checkpoints++;
    this.covered += stream.uncovered + 1;
    stream.uncovered = 0;
    stream.rangeStart = lineNo;
    stream.checkpoints.set(covers, hash);
    stream.lastCovers = covers;
  }

  /** The registry's checkpoints must all be in the log: else its end (or a stream) was cut off. */
  end(recorded: readonly StreamCheckpoint[]): void {
    for (const point of recorded) {
      const stream = this.streams.get(point.s);
      const where = `the registry records a checkpoint of stream ${point.s} up to its line ${point.n}`;
      if (stream === undefined) {
        if (this.trimmed) continue;
        throw new Problem(
          'truncated',
          null,
          `${where}, but the stream is not in the log (lines cut off the end?)`,
        );
      }
      const hash = stream.checkpoints.get(point.n);
      if (hash === point.hash) continue;
      if (this.trimmed && point.n < stream.firstN) continue;
      if (hash !== undefined || point.n <= stream.lastCovers) {
        throw new Problem('tampered', null, `${where}, and the log's checkpoint there differs`);
      }
      throw new Problem(
        'truncated',
        null,
        `${where}; the log's last is up to line ${stream.lastCovers} (lines cut off the end)`,
      );
    }
  }
}

function splitLines(bytes: Buffer): Buffer[] {
  const lines: Buffer[] = [];
  let start = 0;
  while (start < bytes.length) {
    const end = bytes.indexOf(0x0a, start);
    if (end < 0) {
      lines.push(bytes.subarray(start));
      break;
    }
    lines.push(bytes.subarray(start, end));
    start = end + 1;
  }
  return lines;
}

/**
 * Verifies the chain of `paths` (oldest first) with `publicKeys` (raw Ed25519 keys; several when
 * the signing key was replaced). `head`: the registry's audit head, null to check the log alone.
 */
export function verifyAuditPublic(
  paths: readonly string[],
  publicKeys: readonly Uint8Array[],
  head: AuditHeadRecord | null,
  trimmed = false,
): PublicVerifyResult {
  const verifier = new PublicLogVerifier(publicKeys, trimmed);
  const firstLines: number[] = [];
  let total = 0;
  const result = (problem: Problem | null): PublicVerifyResult => {
    let uncovered = 0;
    for (const stream of verifier.streams.values()) uncovered += stream.uncovered;
    const at =
      problem === null || problem.line === null
        ? -1
        : firstLines.findLastIndex((first) => first <= (problem.line as number));
    const file = at < 0 ? null : (paths[at] as string);
    return {
      ok: problem === null,
      problem: problem?.kind ?? null,
      lines: total,
      linesCovered: verifier.covered,
      linesUncovered: uncovered,
      checkpoints: verifier.checkpoints,
      file,
      line: at < 0 ? null : (problem?.line as number) - (firstLines[at] as number) + 1,
      reason:
        problem === null
          ? null
          : file !== null && paths.length > 1
            ? `${basename(file)}: ${problem.reason}`
            : problem.reason,
    };
  };
  try {
    for (const path of paths) {
      let bytes: Buffer;
      try {
        bytes = readFileSync(path);
      } catch (err) {
        throw new Problem('unreadable', null, `cannot read ${path}: ${(err as NodeJS.ErrnoException).code}`);
      }
      firstLines.push(total + 1);
      const lines = splitLines(bytes);
      for (let i = 0; i < lines.length; i++) verifier.line(total + i + 1, lines[i] as Buffer);
      total += lines.length;
    }
    verifier.end(head === null ? [] : recordedCheckpoints(head));
    if (verifier.checkpoints === 0) {
      throw new Problem(
        'no-checkpoints',
        null,
        'the log holds no signed checkpoint: nothing could be checked with a public key (is an audit signing key configured?)',
      );
    }
  } catch (err) {
    if (!(err instanceof Problem)) throw err;
    return result(err);
  }
  return result(null);
}
