/**
 * KEK rotation: a new KEK version becomes active, then every stored DEK version is rewrapped under
 * it in batches, online.
 *
 * Crash safety: the new KEK version, its activation and the rotation record are written in one
 * transaction; each batch's rewraps and the progress cursor are written in one transaction; an old
 * KEK version is destroyed only when no DEK version references it. So at every instant every DEK
 * version is wrapped under a KEK version that is stored, and a crash resumes from the cursor
 * (on the next start, or the next call).
 *
 * In a cluster one replica rotates at a time, under the cluster's rotation lock (a key under its
 * lease; every rotation write is fenced by it). A call on another replica joins the rotation; if
 * the rotating replica dies, its lease lapses, the lock with it, and a joined or idle replica
 * takes the lock and resumes from the stored cursor.
 *
 * Scale: the pass walks the DEK table by key range (never loading it whole), rewraps a batch in
 * parallel worker tasks while the previous batch's transaction commits.
 */

import type { CallContext, RotationStatus } from '../api/index.js';
import { kmsError } from '../errors.js';
import { type AuditFields, type DekRef, OpKind } from '../worker-abi/index.js';
import type { CryptoPool } from './pool.js';
import {
  type DekRecord,
  type DekVersionRecord,
  type Registry,
  type Rewrap,
  ROTATION_LOCK,
  type RotationRecord,
  type StoreCluster,
} from './registry/index.js';

export interface RotationDeps {
  registry: Registry;
  pool: CryptoPool;
  batchSize: number;
  kekId: () => string;
  /** Creates KEK `version` in a worker: wrapped under the master key, and that key's check value. */
  newKek: (version: number, audit: AuditFields) => Promise<{ wrapped: Uint8Array; kcv: Uint8Array }>;
  /** Writes an audit-only line. */
  note: (audit: AuditFields) => Promise<void>;
  /** The time new KEK versions and rotation records are stamped with (the schedule's clock). */
  now?: () => number;
}

export interface RotateOptions {
  /**
   * Start a new rotation only while this is still the active KEK version (the schedule's guard:
   * another replica may have rotated since it looked). An interrupted rotation resumes either way.
   */
  onlyIfActive?: number;
}

/** Passes over the table after the first, to catch DEKs created under the old KEK mid-pass. */
const MAX_EXTRA_PASSES = 3;

/** Who asked for the rotation, for its audit lines. */
type Who = { caller: string | undefined; remote: string | undefined };

export class KekRotation {
  readonly #deps: RotationDeps;
  #running: Promise<RotationStatus> | null = null;
  /**
   * Set from the moment a rotation is started or joined until it has finished, so that status()
   * never shows the previous rotation's `completed` record while the new one prepares its KEK.
   */
  #inProgress = false;
  #stopRequested = false;
  /** Wakes a call waiting for another replica's rotation (see #lockOrJoin) when asked to stop. */
  #wakeJoin: (() => void) | null = null;

  constructor(deps: RotationDeps) {
    this.#deps = deps;
  }

  get running(): boolean {
    return this.#running !== null;
  }

  status(): RotationStatus {
    const { registry } = this.#deps;
    const meta = registry.kekMeta();
    // The stored record: it changes only when a transaction commits, so status shows durable
    // progress, and in a cluster that of whichever replica rotates.
    const progress = registry.rotation();
    return {
      // An interrupted rotation (stored as running, nothing driving it) still reads as running:
      // it resumes at the next start or call.
      state: this.#inProgress ? 'running' : (progress?.state ?? 'idle'),
      kekId: this.#deps.kekId(),
      activeKekVersion: meta?.activeVersion ?? 0,
      targetKekVersion: progress?.target ?? null,
      done: progress?.done ?? 0,
      total: progress?.total ?? 0,
      startedAt: progress?.startedAt ?? null,
      finishedAt: progress?.finishedAt ?? null,
      kekVersions: registry.keks().map((k) => k.version),
    };
  }

  /** Whether a rotation was interrupted (crash or shutdown) and should be resumed. */
  get interrupted(): boolean {
    return this.#deps.registry.rotation()?.state === 'running';
  }

  /** Starts, joins or resumes the rotation; resolves when it has finished (or was stopped). */
  run(ctx?: CallContext, opts: RotateOptions = {}): Promise<RotationStatus> {
    if (this.#running === null) {
      this.#inProgress = true;
      this.#running = this.#rotate(ctx, opts).finally(() => {
        this.#inProgress = false;
        this.#running = null;
      });
    }
    return this.#running;
  }

  #stamp(): string {
    return new Date(this.#deps.now?.() ?? Date.now()).toISOString();
  }

  /** Asks a running rotation to stop at the next batch boundary and waits for it. */
  async stop(): Promise<void> {
    const running = this.#running;
    if (running === null) return;
    this.#stopRequested = true;
    this.#wakeJoin?.();
    try {
      await running;
    } catch {
      // Its error was already reported to whoever started it; progress is saved either way.
    } finally {
      this.#stopRequested = false;
    }
  }

  async #rotate(ctx: CallContext | undefined, opts: RotateOptions): Promise<RotationStatus> {
    const who = { caller: ctx?.caller, remote: ctx?.remoteAddress };
    const cluster = this.#deps.registry.cluster;
    if (cluster !== undefined && !(await this.#lockOrJoin(cluster))) return this.status();
    try {
      const progress = await this.#beginOrResume(who, opts);
      if (progress === null) {
        this.#inProgress = false;
        return this.status();
      }
      const passed = await this.#rewrapAll(progress, who);
      // Stopped mid-way: the stored record still says running (it resumes at the next start).
      if (passed !== null) await this.#finish(passed, who);
    } finally {
      await cluster?.unlock(ROTATION_LOCK);
    }
    this.#inProgress = false;
    return this.status();
  }

  /**
   * Takes the cluster's rotation lock: true when this replica is to rotate. While another replica
   * holds it, this call joins that rotation and waits: false once it has completed (or on stop);
   * if its holder's lease lapses first, this replica takes the lock and resumes the rotation.
   */
  async #lockOrJoin(cluster: StoreCluster): Promise<boolean> {
    const { registry } = this.#deps;
    let joined = false;
    for (;;) {
      // Listen before trying, so a release between a failed try and the wait is not missed.
      let off: () => void = () => undefined;
      const released = new Promise<void>((resolve) => {
        this.#wakeJoin = resolve;
        off = cluster.onUnlocked(ROTATION_LOCK, resolve);
      });
      try {
        if (await cluster.tryLock(ROTATION_LOCK)) {
          // What the previous holder wrote is read linearizably, not awaited from the watch.
          await registry.refresh();
          if (!joined || registry.rotation()?.state === 'running') return true;
          await cluster.unlock(ROTATION_LOCK);
          return false;
        }
        joined = true;
        await released;
      } finally {
        off();
        this.#wakeJoin = null;
      }
      if (this.#stopRequested) return false;
    }
  }

  /**
   * A new KEK version and a running rotation to it, or the interrupted rotation as stored; null
   * when `onlyIfActive` is no longer the active version (nothing to do).
   */
  async #beginOrResume(who: Who, opts: RotateOptions): Promise<RotationRecord | null> {
    const { registry } = this.#deps;
    const stored = registry.rotation();
    if (stored !== undefined && stored.state !== 'completed') {
      await this.#deps.note({
        op: 'rotate_kek',
        kekVersion: stored.target,
        detail: `resume at ${stored.done}/${stored.total}`,
        ...who,
      });
      return stored;
    }
    const meta = registry.kekMeta();
    if (meta === undefined) throw kmsError('STORE_CORRUPT', 'the KEK metadata is missing from the registry');
    const active = meta.activeVersion;
    if (opts.onlyIfActive !== undefined && opts.onlyIfActive !== active) return null;
    const version = active + 1;
    const { wrapped, kcv } = await this.#deps.newKek(version, {
      op: 'rotate_kek',
      kekVersion: version,
      detail: `start: KEK version ${active} -> ${version}`,
      ...who,
    });
    const now = this.#stamp();
    const progress: RotationRecord = {
      state: 'running',
      target: version,
      cursor: null,
      done: 0,
      total: await registry.dekRecordCount(),
      startedAt: now,
      finishedAt: null,
    };
    await registry.beginRotation(
      { kekId: this.#deps.kekId(), version, wrapped, createdAt: now, refs: 0 },
      progress,
      kcv,
    );
    return progress;
  }

  /**
   * Passes over every DEK record, a batch per transaction (the next batch is rewrapped while the
   * last one commits), until no DEK version is left under an older KEK or the extra passes run out.
   * Returns the last progress, or null when asked to stop.
   */
  async #rewrapAll(start: RotationRecord, who: Who): Promise<RotationRecord | null> {
    const { registry } = this.#deps;
    let progress = start;
    let pendingCommit: Promise<unknown> = Promise.resolve();
    let extraPasses = 0;
    for (;;) {
      if (this.#stopRequested) {
        await pendingCommit;
        return null;
      }
      const records = await registry.deksAfter(progress.cursor, this.#deps.batchSize);
      const last = records.at(-1);
      if (last === undefined) {
        await pendingCommit;
        const target = progress.target;
        const stragglers = registry.keks().some((k) => k.version !== target && k.refs > 0);
        if (!stragglers || extraPasses >= MAX_EXTRA_PASSES) return progress;
        extraPasses++;
        progress = { ...progress, cursor: null };
        await registry.saveRotation(progress);
        continue;
      }
      const rewraps = await this.#rewrapBatch(records, progress.target, who);
      const next: RotationRecord = {
        ...progress,
        cursor: last.keyId,
        done: Math.min(progress.total, progress.done + records.length),
      };
      await pendingCommit;
      pendingCommit = registry.applyRewraps(rewraps, next);
      progress = next;
    }
  }

  /** Records completion and destroys the KEK versions no DEK version needs any more. */
  async #finish(progress: RotationRecord, who: Who): Promise<void> {
    const finished: RotationRecord = {
      ...progress,
      state: 'completed',
      done: progress.total,
      finishedAt: this.#stamp(),
    };
    const { registry } = this.#deps;
    const destroyed = await registry.finishRotation(finished);
    // etcd keeps every revision until compacted: without this, each rotation (a new revision of
    // every DEK record) would grow it for good. The rotation is complete whether or not this works.
    // The audit line says which, since a failed compaction (etcd without root rights, say) is
    // otherwise silent.
    const compacted = await registry.compactHistory().then(
      (revision) => (revision === undefined ? '' : `; history compacted to revision ${revision}`),
      (err: Error) => `; history not compacted (${err.message})`,
    );
    await this.#deps.note({
      op: 'rotate_kek',
      kekVersion: finished.target,
      detail: `complete: ${finished.total} keys; destroyed KEK versions [${destroyed.join(',')}]${compacted}`,
      ...who,
    });
  }

  /** Rewraps every version of `records` not yet under `target`, split across the workers. */
  async #rewrapBatch(records: DekRecord[], target: number, who: Who): Promise<Rewrap[]> {
    const pending: { record: DekRecord; version: DekVersionRecord }[] = [];
    for (const record of records) {
      if (record.state !== 'active') continue;
      for (const version of record.versions) if (version.kek !== target) pending.push({ record, version });
    }
    const pool = this.#deps.pool;
    const chunks = Math.max(1, Math.min(pool.threads, Math.ceil(pending.length / 64)));
    const perChunk = Math.ceil(pending.length / chunks);
    const parts = await Promise.all(
      Array.from({ length: chunks }, async (_, c) => {
        const slice = pending.slice(c * perChunk, (c + 1) * perChunk);
        // One buffer holds the chunk's wrapped keys; the DekRefs are views into it, so the task
        // clone copies one backing store rather than one per key.
        // Wrapped keys of both formats may be mixed, so each view spans its own length.
        const packed = new Uint8Array(slice.reduce((sum, { version }) => sum + version.wrapped.length, 0));
        let at = 0;
        const deks: DekRef[] = slice.map(({ record, version }) => {
          packed.set(version.wrapped, at);
          at += version.wrapped.length;
          return {
            keyId: record.keyId,
            keyVersion: version.v,
            kekVersion: version.kek,
            wrapped: packed.subarray(at - version.wrapped.length, at),
          };
        });
        // One audit line per batch, not per key: the rotation is one operation.
        const audit =
          c === 0
            ? {
                op: 'rotate_kek_batch',
                kekVersion: target,
                detail: `rewrap ${pending.length} key versions`,
                ...who,
              }
            : null;
        const result = await pool.runBulk(OpKind.rewrap, deks, audit);
        const rewraps: Rewrap[] = [];
        for (let i = 0; i < result.count; i++) {
          const error = result.error(i);
          if (error !== null) {
            throw kmsError(error.code, `KEK rotation batch failed (${error.code}); it will resume`);
          }
          if (i >= slice.length) continue; // the audit note
          const { record, version } = slice[i] as (typeof slice)[number];
          rewraps.push({
            keyId: record.keyId,
            v: version.v,
            from: version.wrapped,
            to: result.output(i),
            toKek: target,
          });
        }
        return rewraps;
      }),
    );
    return parts.flat();
  }
}
