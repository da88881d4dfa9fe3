/**
 * How audit streams are linked across workers and restarts (shared by the main thread, which keeps
 * the head in the registry, and the worker-side verifier). See README "Audit log".
 *
 * Every start of the KMS is a numbered session. The first line of each of its streams names the
 * last session that recorded a head: its number, whether it was sealed by a clean stop, and the
 * last signed point (`s:n:mac`) of each of its streams. The `stop` line names every stream's head
 * at that moment. MACs are not secret (they are in the log): no key material is stored here.
 */

import type { StreamCheckpoint } from './audit-checkpoint.js';

/** The last signed block of a stream: its id, the `n` of its last line and its MAC (hex). */
export interface StreamHead {
  s: string;
  n: number;
  mac: string;
}

/** A session as another session's links (or the registry) name it. */
export interface SessionClaim {
  session: number;
  sealed: boolean;
  heads: StreamHead[];
}

/** The registry's audit head (meta key `audit_head`). */
export interface AuditHeadRecord {
  /** The current (or last) session's number, counted from 1. */
  session: number;
  /** Its streams' heads as last saved (with the group fsync, and at start and stop). */
  heads: StreamHead[];
  /** Whether a clean stop sealed it (then `heads` are the streams' final ends). */
  sealed: boolean;
  /** What this session's first lines name: the last earlier session that recorded heads. */
  links: SessionClaim | null;
  /**
   * Each stream's last signed checkpoint (audit signing on), saved like `heads`: the log must
   * hold them, which `audit verify --public-key` checks without the master key.
   */
  checkpoints?: StreamCheckpoint[];
  /** The last earlier session's checkpoints, until this one has its own. */
  prevCheckpoints?: StreamCheckpoint[];
}

/** `s:n:mac` items separated by spaces, sorted by stream id: one string, like every line field. */
export function formatHeads(heads: Iterable<StreamHead>): string {
  return [...heads]
    .sort((a, b) => (a.s < b.s ? -1 : a.s > b.s ? 1 : 0))
    .map((h) => `${h.s}:${h.n}:${h.mac}`)
    .join(' ');
}

const HEAD = /^([0-9a-f]{12}):(0|[1-9][0-9]{0,15}):([0-9a-f]{64})$/;

/** The inverse of formatHeads; null if malformed. */
export function parseHeads(text: unknown): StreamHead[] | null {
  if (typeof text !== 'string') return null;
  if (text === '') return [];
  const heads: StreamHead[] = [];
  for (const item of text.split(' ')) {
    const match = HEAD.exec(item);
    if (match === null) return null;
    // The pattern's groups all take part in every match.
    heads.push({ s: match[1] as string, n: Number(match[2]), mac: match[3] as string });
  }
  return heads;
}

/** The fields the first line of every stream of a session carries (JSON, after the others). */
export function linkFields(session: number, links: SessionClaim | null): string {
  return (
    `,"session":"${session}","prev_session":"${links?.session ?? 0}",` +
    `"prev_sealed":"${links?.sealed === true}","prev_heads":"${formatHeads(links?.heads ?? [])}"`
  );
}

/** The session a new start begins after the registry's head `previous` (undefined: none yet). */
export function nextSession(previous: AuditHeadRecord | undefined): AuditHeadRecord {
  if (previous === undefined) return { session: 1, heads: [], sealed: false, links: null };
  const prevCheckpoints =
    (previous.checkpoints?.length ?? 0) > 0 ? previous.checkpoints : previous.prevCheckpoints;
  // A session that recorded no head (killed during its start) is skipped: link to what it linked to.
  const links =
    previous.heads.length > 0
      ? { session: previous.session, sealed: previous.sealed, heads: previous.heads }
      : previous.links;
  const next: AuditHeadRecord = { session: previous.session + 1, heads: [], sealed: false, links };
  if (prevCheckpoints !== undefined && prevCheckpoints.length > 0) next.prevCheckpoints = prevCheckpoints;
  return next;
}

/** Every checkpoint the registry says the log holds: this session's and the last earlier one's. */
export function recordedCheckpoints(head: AuditHeadRecord): StreamCheckpoint[] {
  return [...(head.prevCheckpoints ?? []), ...(head.checkpoints ?? [])];
}
