/**
 * This replica's membership of a KMS cluster in etcd, and what it lets the cluster promise.
 *
 * Each replica holds a lease and, under it, `members/<replicaId>`: the newest etcd revision its
 * watch has applied. From that:
 *  - **Serving bound.** A replica serves only while its lease is surely alive: until the send time
 *    of its last answered keepalive plus the TTL, minus a margin. etcd expires the lease no earlier
 *    than that (it received the keepalive after we sent it), so a replica that loses etcd stops
 *    serving before its lease, and its member key, can vanish. It also serves only once its watch
 *    has caught up with its own join, so it never serves from a view older than its membership.
 *  - **Confirmed changes.** `confirmApplied` writes `sync`; every replica's watch, on seeing it,
 *    publishes the revision it has applied; the caller waits until each member has published one
 *    at least as new, or has gone (its lease lapsed, so it had already stopped serving). Then no
 *    live replica can still act on anything committed before: "destroyed" means destroyed
 *    everywhere.
 *  - **Locks.** A lock is a key created under this replica's lease: it vanishes with the replica.
 *    Writes made under a lock compare its value in their transaction (fencing), so a replica that
 *    lost its lease while paused cannot commit over the one that took the lock from it.
 */
import type { Etcd3, Lease } from 'etcd3';
import { type CodedError, kmsError } from '../../errors.js';
import type { StoreChange, StoreEntry } from './store.js';

/** `promise`, or a rejection once `ms` have passed without its answer (the call itself goes on). */
function answerWithin<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${Math.round(ms)} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** Default lease TTL: how long a replica that has lost etcd keeps serving, at most. */
export const DEFAULT_LEASE_TTL_SECONDS = 10;
export const MIN_LEASE_TTL_SECONDS = 2;

export const MEMBERS = 'members/';
const PUBLISH_RETRY_MS = 200;
const SYNC = 'sync';
const LOCKS = 'lock/';

export interface MemberRecord {
  replicaId: string;
  /** Newest revision applied, as a decimal string (msgpack has no portable 64-bit bigint). */
  applied: string;
  pid: number;
  since: string;
}

export interface LockRecord {
  holder: string;
  /** The holder's lease at the time it took the lock: a later lease of the same replica is a new holder. */
  lease: string;
}

/** What the store gives its membership: its client, key naming, value encoding and watch. */
export interface MembershipHost {
  client: Etcd3;
  etcdKey(key: string): string;
  encode(value: unknown): Buffer;
  /** Newest revision the store's watch has delivered to its listeners. */
  appliedRevision(): bigint;
  watch(prefix: string, onChange: (change: StoreChange) => void): () => void;
  range(prefix: string): Promise<StoreEntry[]>;
}

export interface MembershipOptions {
  replicaId: string;
  ttlSeconds: number;
  /** Logs a lapse or a recovery of this replica's lease (never key material). */
  onStateChange?: (serving: boolean, why: string) => void;
  now?: () => number;
}

export interface MembershipStatus {
  replicaId: string;
  serving: boolean;
  /** Until when this replica may serve without another answered keepalive (ISO time). */
  servingUntil: string | null;
  leaseTtlSeconds: number;
  /** Why it is not serving, when it is not. */
  reason: string | null;
}

function registryUnavailable(message: string): CodedError {
  return kmsError('REGISTRY_UNAVAILABLE', message);
}

export class Membership {
  readonly replicaId: string;
  readonly #host: MembershipHost;
  readonly #ttlMs: number;
  readonly #marginMs: number;
  readonly #now: () => number;
  readonly #onStateChange: ((serving: boolean, why: string) => void) | undefined;
  #lease: Lease | null = null;
  #leaseId = '';
  /** The member key's revision at this lease's join: serving waits until the watch reaches it. */
  #joinRevision = -1n;
  #validUntil = 0;
  #lastError = 'not joined yet';
  #timer: NodeJS.Timeout | null = null;
  #closed = false;
  #wasServing = false;
  #publishing: Promise<void> | null = null;
  #publishAgain = false;
  readonly #unwatch: (() => void)[] = [];

  private constructor(host: MembershipHost, opts: MembershipOptions) {
    this.#host = host;
    this.replicaId = opts.replicaId;
    this.#ttlMs = opts.ttlSeconds * 1000;
    this.#marginMs = Math.min(2000, this.#ttlMs / 5);
    this.#now = opts.now ?? Date.now;
    this.#onStateChange = opts.onStateChange;
  }

  /** Joins the cluster; resolves once this replica may serve. */
  static async join(host: MembershipHost, opts: MembershipOptions): Promise<Membership> {
    if (opts.ttlSeconds < MIN_LEASE_TTL_SECONDS || !Number.isInteger(opts.ttlSeconds)) {
      throw kmsError(
        'CONFIG_INVALID',
        `the lease TTL must be a whole number of seconds, at least ${MIN_LEASE_TTL_SECONDS}`,
      );
    }
    const membership = new Membership(host, opts);
    membership.#unwatch.push(host.watch(SYNC, (c) => membership.#onSync(c)));
    await membership.#join(true);
    await membership.#caughtUp(opts.ttlSeconds * 1000);
    membership.#wasServing = true;
    membership.#schedule(membership.#ttlMs / 3);
    return membership;
  }

  /** The lease this replica's member key, locks and votes live under now (a rejoin changes it). */
  get leaseId(): string {
    return this.#leaseId;
  }

  get #memberKey(): string {
    return MEMBERS + this.replicaId;
  }

  /**
   * Grants a lease and creates the member key under it. At start-up a member key of the same id
   * that is still live means another process runs with this replica id: wait for its lease to
   * lapse (a restart after a crash), then refuse.
   */
  async #join(first: boolean): Promise<void> {
    const client = this.#host.client;
    const sentAt = this.#now();
    const lease = client.lease(this.#ttlMs / 1000, { autoKeepAlive: false });
    // A lost lease is handled by the keepalive loop; the event must still have a listener.
    lease.on('lost', () => undefined);
    const leaseId = await lease.grant();
    const key = this.#host.etcdKey(this.#memberKey);
    const deadline = sentAt + (first ? this.#ttlMs + 2000 : 0);
    for (;;) {
      const res = await client
        .if(key, 'Create', '==', 0)
        .then(client.put(key).value(this.#host.encode(this.#record())).lease(leaseId))
        .commit();
      if (res.succeeded) {
        this.#lease = lease;
        this.#leaseId = leaseId;
        this.#joinRevision = BigInt(res.header.revision);
        this.#validUntil = sentAt + this.#ttlMs - this.#marginMs;
        return;
      }
      if (this.#now() >= deadline) {
        await lease.revoke().catch(() => undefined);
        throw kmsError(
          'CONFIG_INVALID',
          `replica id ${this.replicaId} is in use by a live replica of this cluster`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }

  #record(): MemberRecord {
    return {
      replicaId: this.replicaId,
      applied: this.#host.appliedRevision().toString(),
      pid: process.pid,
      since: new Date(this.#now()).toISOString(),
    };
  }

  /** Waits until the watch has delivered this replica's own join. */
  async #caughtUp(timeoutMs: number): Promise<void> {
    const until = this.#now() + timeoutMs;
    while (this.#host.appliedRevision() < this.#joinRevision) {
      if (this.#now() >= until)
        throw registryUnavailable('the etcd watch did not catch up with this replica joining');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  #schedule(ms: number): void {
    if (this.#closed) return;
    this.#timer = setTimeout(() => void this.#keepAlive(), ms);
    this.#timer.unref();
  }

  /** One keepalive (or, once the lease has expired in etcd, a new join), then the next in TTL/3. */
  async #keepAlive(): Promise<void> {
    const lease = this.#lease;
    const sentAt = this.#now();
    try {
      if (lease === null || lease.revoked()) {
        await this.#join(false);
        await this.#caughtUp(this.#ttlMs);
        void this.#publish();
      } else {
        // Bounded by the renewal period: a keepalive sent to a member that just died can wait for
        // the client's call timeout (3 s), longer than a short lease, and the next one would only
        // be sent after it. Seen as a replica that stopped serving when one of three members was
        // killed under load.
        await answerWithin(lease.keepaliveOnce(), this.#ttlMs / 3);
        this.#validUntil = sentAt + this.#ttlMs - this.#marginMs;
      }
      this.#lastError = '';
      this.#schedule(this.#ttlMs / 3);
    } catch (err) {
      this.#lastError = err instanceof Error ? err.message : String(err);
      // An expired lease is revoked by the client (keepaliveOnce emits its loss): rejoin next time.
      // A try that already waited its bound is followed by the next at once.
      this.#schedule(Math.max(0, Math.min(500, this.#ttlMs / 4) - (this.#now() - sentAt)));
    }
    this.#noteState();
  }

  #noteState(): void {
    const serving = this.serving();
    if (serving !== this.#wasServing) {
      this.#wasServing = serving;
      this.#onStateChange?.(serving, serving ? 'lease renewed' : this.#reason());
    }
  }

  serving(): boolean {
    return (
      !this.#closed && this.#now() < this.#validUntil && this.#host.appliedRevision() >= this.#joinRevision
    );
  }

  #reason(): string {
    if (this.#closed) return 'closed';
    if (this.#now() >= this.#validUntil)
      return `etcd has not renewed this replica's lease (${this.#lastError || 'no answer'})`;
    return 'catching up with the etcd watch';
  }

  /** Throws REGISTRY_UNAVAILABLE unless this replica may serve now (see the serving bound). */
  assertServing(): void {
    if (this.serving()) return;
    this.#noteState();
    throw registryUnavailable(`this KMS replica is not serving: ${this.#reason()}`);
  }

  status(): MembershipStatus {
    const serving = this.serving();
    return {
      replicaId: this.replicaId,
      serving,
      servingUntil: this.#validUntil > 0 ? new Date(this.#validUntil).toISOString() : null,
      leaseTtlSeconds: this.#ttlMs / 1000,
      reason: serving ? null : this.#reason(),
    };
  }

  /** Another replica asks every member to report how far it has applied. */
  #onSync(change: StoreChange): void {
    const by = (change.value as { by?: string } | undefined)?.by;
    if (by !== this.replicaId) void this.#publish();
  }

  /** Writes this replica's applied revision; calls while one write is in flight share the next. */
  #publish(): Promise<void> {
    if (this.#publishing !== null) {
      this.#publishAgain = true;
      return this.#publishing;
    }
    this.#publishing = (async () => {
      let failed = false;
      do {
        this.#publishAgain = false;
        const lease = this.#lease;
        if (lease === null || lease.revoked() || this.#closed) return;
        failed = await lease
          .put(this.#host.etcdKey(this.#memberKey))
          .value(this.#host.encode(this.#record()))
          .exec()
          .then(
            () => false,
            () => true,
          );
      } while (this.#publishAgain);
      // A lost answer would leave a destroy elsewhere waiting for its full timeout: try again
      // while the lease lives (once it lapses this replica has stopped serving anyway).
      if (failed) setTimeout(() => void this.#publish(), PUBLISH_RETRY_MS).unref();
    })().finally(() => {
      this.#publishing = null;
    });
    return this.#publishing;
  }

  /** After the store dropped its cache and watches from the current revision: nothing older is held. */
  cacheDropped(): void {
    void this.#publish();
  }

  /**
   * Resolves once every live member has applied every change committed before this call: each
   * has published an applied revision at least that of a `sync` written now, or has left (its
   * lease lapsed, and it stopped serving before that). REGISTRY_UNAVAILABLE after `timeoutMs`,
   * naming the replicas that did not answer; what was committed stays committed.
   */
  async confirmApplied(timeoutMs = 2 * this.#ttlMs + 1000): Promise<void> {
    const client = this.#host.client;
    let syncRevision: bigint;
    try {
      const res = await client
        .put(this.#host.etcdKey(SYNC))
        .value(this.#host.encode({ by: this.replicaId, at: new Date(this.#now()).toISOString() }))
        .exec();
      syncRevision = BigInt(res.header.revision);
    } catch (err) {
      throw registryUnavailable(
        `cannot reach etcd to confirm the change on every replica (${(err as Error).message})`,
      );
    }
    const pending = new Set<string>();
    const applied = (record: MemberRecord) => BigInt(record.applied) >= syncRevision;
    let settle: (err?: Error) => void = () => undefined;
    const done = new Promise<void>((resolve, reject) => {
      settle = (err) => (err ? reject(err) : resolve());
    });
    // Listen before reading, so no member's answer falls between the read and the first event.
    // What the watch has heard is newer than any listing that may race it: it wins.
    const heard = new Map<string, MemberRecord | undefined>();
    const unwatch = this.#host.watch(MEMBERS, ({ key, value }) => {
      const id = key.slice(MEMBERS.length);
      heard.set(id, value as MemberRecord | undefined);
      if (value === undefined || applied(value as MemberRecord)) pending.delete(id);
      if (pending.size === 0 && listed) settle();
    });
    let listed = false;
    const timer = setTimeout(() => {
      settle(
        registryUnavailable(
          `replicas ${[...pending].join(', ')} did not confirm the change in ${timeoutMs} ms; it is committed, and retrying waits again`,
        ),
      );
    }, timeoutMs);
    try {
      for (const { key, value } of await this.#host.range(MEMBERS)) {
        const id = key.slice(MEMBERS.length);
        const latest = heard.has(id) ? heard.get(id) : (value as MemberRecord);
        if (id !== this.replicaId && latest !== undefined && !applied(latest)) pending.add(id);
      }
      listed = true;
      if (pending.size === 0) settle();
      await done;
    } catch (err) {
      if ((err as CodedError).code === 'REGISTRY_UNAVAILABLE') throw err;
      throw registryUnavailable(`cannot list the replicas to confirm the change (${(err as Error).message})`);
    } finally {
      clearTimeout(timer);
      unwatch();
    }
  }

  /** The store key of lock `name`, and the value that says this replica (this lease) holds it. */
  lockKey(name: string): string {
    return LOCKS + name;
  }

  holds(value: unknown): boolean {
    const lock = value as LockRecord | undefined;
    return lock?.holder === this.replicaId && lock.lease === this.#leaseId;
  }

  /** Takes lock `name` under this replica's lease if no one holds it; false if another does. */
  async tryLock(name: string): Promise<boolean> {
    this.assertServing();
    const client = this.#host.client;
    const key = this.#host.etcdKey(this.lockKey(name));
    const value: LockRecord = { holder: this.replicaId, lease: this.#leaseId };
    try {
      const res = await client
        .if(key, 'Create', '==', 0)
        .then(client.put(key).value(this.#host.encode(value)).lease(this.#leaseId))
        .commit();
      return res.succeeded;
    } catch (err) {
      throw registryUnavailable(`cannot reach etcd to take the ${name} lock (${(err as Error).message})`);
    }
  }

  /** Releases lock `name` if this replica still holds it. */
  async unlock(name: string): Promise<void> {
    const client = this.#host.client;
    const key = this.#host.etcdKey(this.lockKey(name));
    const value: LockRecord = { holder: this.replicaId, lease: this.#leaseId };
    await client
      .if(key, 'Value', '==', this.#host.encode(value))
      .then(client.delete().key(key))
      .commit()
      .catch(() => undefined); // unreachable etcd: the lease lapses, and the lock with it
  }

  /** Calls `onReleased` whenever lock `name` is released or lapses. Returns the unsubscribe function. */
  onUnlocked(name: string, onReleased: () => void): () => void {
    const key = this.lockKey(name);
    return this.#host.watch(key, (c) => {
      if (c.key === key && c.value === undefined) onReleased();
    });
  }

  /** Compacts etcd's history up to `revision`, once every live replica has applied it. */
  async compact(revision: bigint): Promise<string> {
    await this.confirmApplied();
    await this.#host.client.kv.compact({ revision: revision.toString() });
    return revision.toString();
  }

  /** Leaves the cluster: revoking the lease removes the member key and any lock at once. */
  async leave(): Promise<void> {
    this.#closed = true;
    if (this.#timer !== null) clearTimeout(this.#timer);
    for (const unwatch of this.#unwatch.splice(0)) unwatch();
    await this.#publishing;
    await this.#lease?.revoke().catch(() => undefined);
  }
}
