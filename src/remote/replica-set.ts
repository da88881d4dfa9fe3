/**
 * Several progressdb-kms replicas of one cluster behind one RemoteTransport, so a client keeps
 * working while a replica dies, restarts or drains.
 *
 * Each call goes to the replica with the fewest calls in flight (ties in turn). A replica that
 * fails as a replica does (unreachable, timed out, not ready) is taken out at once and the call
 * moves on to the next one when repeating it is safe (see mayRepeat); a replica that is out comes
 * back only after a health probe answers ok, probed with a doubling backoff, so a dead or
 * black-holed replica costs callers nothing after its first failure. When every replica is out,
 * calls still try them all (soonest probe first) rather than fail without trying.
 */

import type { KmsHealth } from '../api/index.js';
import { type CodedError, toCodedError } from '../errors.js';
import { mayRepeat, type RemoteTransport } from './transport.js';

export interface Replica {
  /** host:port as given, for messages. */
  where: string;
  transport: RemoteTransport;
}

/** First wait before probing a replica that failed; doubles per failed probe up to the max. */
const PROBE_MIN_MS = 250;
const PROBE_MAX_MS = 10_000;

/** Failures that say "this replica cannot serve now", not "this request is wrong". */
const REPLICA_FAULTS: ReadonlySet<string> = new Set([
  'KMS_UNAVAILABLE',
  'REGISTRY_UNAVAILABLE',
  'TIMEOUT',
  'NOT_READY',
]);

export function isReplicaFault(err: CodedError): boolean {
  return REPLICA_FAULTS.has(err.code);
}

interface Member extends Replica {
  inFlight: number;
  /** Out of rotation until a probe succeeds. */
  out: boolean;
  probeDelayMs: number;
  /** performance.now() of the next probe while out. */
  probeAt: number;
  probeTimer: NodeJS.Timeout | null;
}

export class ReplicaSet implements RemoteTransport {
  readonly maxBatchBytes: number;
  readonly coalesce: boolean;
  readonly #members: Member[];
  #turn = 0;
  #closed = false;

  constructor(replicas: readonly Replica[]) {
    if (replicas.length === 0) throw new Error('ReplicaSet needs at least one replica');
    this.#members = replicas.map((r) => ({
      ...r,
      inFlight: 0,
      out: false,
      probeDelayMs: PROBE_MIN_MS,
      probeAt: 0,
      probeTimer: null,
    }));
    this.maxBatchBytes = Math.min(...replicas.map((r) => r.transport.maxBatchBytes));
    this.coalesce = replicas.every((r) => r.transport.coalesce === true);
  }

  /** Replicas currently in rotation, for health reporting and tests. */
  inRotation(): string[] {
    return this.#members.filter((m) => !m.out).map((m) => m.where);
  }

  async call(req: Parameters<RemoteTransport['call']>[0]): Promise<unknown> {
    let last: CodedError | undefined;
    for (const member of this.#order()) {
      member.inFlight++;
      try {
        const result = await member.transport.call(req);
        if (member.out) this.#bringBack(member);
        return result;
      } catch (thrown) {
        const err = toCodedError(thrown);
        if (!isReplicaFault(err)) throw err;
        this.#takeOut(member);
        last = err;
        if (!mayRepeat(req.op, err)) throw err;
      } finally {
        member.inFlight--;
      }
    }
    throw last;
  }

  /** Every replica once: those in rotation by load (ties in turn), then those out, soonest probe first. */
  #order(): Member[] {
    const n = this.#members.length;
    const start = this.#turn++ % n;
    const rotated: Member[] = [];
    for (let i = 0; i < n; i++) rotated.push(this.#members[(start + i) % n] as Member);
    const serving = rotated.filter((m) => !m.out).sort((a, b) => a.inFlight - b.inFlight);
    const out = rotated.filter((m) => m.out).sort((a, b) => a.probeAt - b.probeAt);
    return serving.concat(out);
  }

  #takeOut(member: Member): void {
    if (member.out || this.#closed) return;
    member.out = true;
    member.probeDelayMs = PROBE_MIN_MS;
    this.#scheduleProbe(member);
  }

  #bringBack(member: Member): void {
    member.out = false;
    if (member.probeTimer !== null) clearTimeout(member.probeTimer);
    member.probeTimer = null;
  }

  #scheduleProbe(member: Member): void {
    member.probeAt = performance.now() + member.probeDelayMs;
    member.probeTimer = setTimeout(() => void this.#probe(member), member.probeDelayMs);
    // A client with nothing else to do must not be kept alive by its probes.
    member.probeTimer.unref();
  }

  async #probe(member: Member): Promise<void> {
    member.probeTimer = null;
    let healthy = false;
    try {
      healthy = ((await member.transport.call({ op: 'health' })) as KmsHealth).ok === true;
    } catch {
      healthy = false;
    }
    if (this.#closed || !member.out) return;
    if (healthy) {
      this.#bringBack(member);
      return;
    }
    member.probeDelayMs = Math.min(PROBE_MAX_MS, member.probeDelayMs * 2);
    this.#scheduleProbe(member);
  }

  async close(): Promise<void> {
    this.#closed = true;
    for (const m of this.#members) if (m.probeTimer !== null) clearTimeout(m.probeTimer);
    await Promise.all(this.#members.map((m) => m.transport.close()));
  }
}
