/**
 * Verifies an audit chain: the rolled files and the live one, read in order, one file at a time,
 * through one LogVerifier (audit-verify.ts); a problem is named by its file and line there.
 * Worker-only: it needs the audit key.
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import type { AuditHeadRecord } from '../src/audit-link.js';
import type { VerifyAuditResult } from '../src/worker-abi/index.js';
import { auditKeyId } from './audit-stream.js';
import { Failure, LogVerifier, namedPoints } from './audit-verify.js';

/** The audit key, or every audit key a re-keyed log may be signed with, by id (auditKeyId). */
export type AuditKeys = Buffer | ReadonlyMap<string, Buffer>;

function keysById(keys: AuditKeys): ReadonlyMap<string, Buffer> {
  return Buffer.isBuffer(keys) ? new Map([[auditKeyId(keys), keys]]) : keys;
}

/** Verifies one audit log file on its own (a log that never rolled over, or a copy). */
export function verifyAuditFile(
  auditKey: AuditKeys,
  path: string,
  head: AuditHeadRecord | null = null,
): VerifyAuditResult {
  return verifyAuditFiles(auditKey, [path], head);
}

class UnreadableFile {
  constructor(
    readonly path: string,
    readonly code: string,
  ) {}
}

function readLines(path: string): string[] {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new UnreadableFile(path, (err as NodeJS.ErrnoException).code ?? 'error');
  }
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  return lines;
}

/**
 * Verifies an audit chain of one or more files (`paths`, oldest first); stops at the first bad
 * line and names its file. `head` is the registry's audit head: the sessions must form one chain
 * of links, and the chain's end must reach that head. `trimmed`: the chain starts at paths[0],
 * the files before it having been removed (see the module comment). Files are read one at a
 * time, twice (the first pass finds the points links name), so memory stays one file's worth.
 */
export function verifyAuditFiles(
  auditKey: AuditKeys,
  paths: readonly string[],
  head: AuditHeadRecord | null = null,
  trimmed = false,
): VerifyAuditResult {
  const claim = head === null ? null : head.heads.length > 0 ? { ...head } : head.links;
  /** The global number of each file's first line, to name a bad line by file and line. */
  const firstLines: number[] = [];
  let total = 0;
  try {
    const named = namedPoints([], head);
    let last: string[] = [];
    for (const path of paths) {
      last = readLines(path);
      for (const point of namedPoints(last, null)) named.add(point);
    }
    const verifier = new LogVerifier(keysById(auditKey), named, trimmed);
    for (let f = 0; f < paths.length; f++) {
      const lines = f === paths.length - 1 ? last : readLines(paths[f] as string);
      firstLines.push(total + 1);
      for (let i = 0; i < lines.length; i++) verifier.line(total + i + 1, lines[i] as string);
      total += lines.length;
    }
    verifier.end(total, head, claim);
  } catch (err) {
    if (err instanceof UnreadableFile) {
      const recorded =
        claim === null ? '' : `, but the registry records lines up to session ${claim.session}`;
      return {
        ok: false,
        linesVerified: 0,
        firstBadLine: null,
        file: err.path,
        reason: `cannot read ${err.path}: ${err.code}${recorded}`,
      };
    }
    if (!(err instanceof Failure)) throw err;
    const at = err.line === null ? -1 : firstLines.findLastIndex((first) => first <= (err.line as number));
    return {
      ok: false,
      linesVerified: err.line === null ? total : err.line - 1,
      firstBadLine: at < 0 ? null : (err.line as number) - (firstLines[at] as number) + 1,
      file: at < 0 ? null : (paths[at] as string),
      reason: paths.length > 1 && at >= 0 ? `${basename(paths[at] as string)}: ${err.reason}` : err.reason,
    };
  }
  return { ok: true, linesVerified: total, firstBadLine: null, file: null, reason: null };
}
