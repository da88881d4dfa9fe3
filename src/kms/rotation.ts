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
 * Scale: the pass walks the DEK table by key range (never loading it whole), rewraps a batch in
 * parallel worker tasks while the previous batch's transaction commits.
 */

import type { CallContext, RotationStatus } from '../api/index.js';
import { kmsError } from '../errors.js';
import { WRAPPED_KEY_BYTES } from '../format.js';
import { type AuditFields, type DekRef, OpKind } from '../worker-abi/index.js';
import type { CryptoPool } from './pool.js';
import type { DekRecord, DekVersionRecord, Registry, Rewrap, RotationRecord } from './registry/index.js';

export interface RotationDeps {
  registry: Registry;
  pool: CryptoPool;
  batchSize: number;
  kekId: () => string;
  /** Creates KEK `version` in a worker; returns it wrapped under the master key. */
  newKek: (version: number, audit: AuditFields) => Promise<Uint8Array>;
  /** Writes an audit-only line. */
  note: (audit: AuditFields) => Promise<void>;
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
  #progress: RotationRecord | null;

  constructor(deps: RotationDeps) {
    this.#deps = deps;
    this.#progress = deps.registry.rotation() ?? null;
  }

  get running(): boolean {
    return this.#running !== null;
  }

  status(): RotationStatus {
    const { registry } = this.#deps;
    const meta = registry.kekMeta();
    const progress = this.#progress;
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
    return this.#progress?.state === 'running';
  }

  /** Starts, joins or resumes the rotation; resolves when it has finished (or was stopped). */
  run(ctx?: CallContext): Promise<RotationStatus> {
    if (this.#running === null) {
      this.#inProgress = true;
      this.#running = this.#rotate(ctx).finally(() => {
        this.#inProgress = false;
        this.#running = null;
      });
    }
    return this.#running;
  }

  /** Asks a running rotation to stop at the next batch boundary and waits for it. */
  async stop(): Promise<void> {
    const running = this.#running;
    if (running === null) return;
    this.#stopRequested = true;
    try {
      await running;
    } catch {
      // Its error was already reported to whoever started it; progress is saved either way.
    } finally {
      this.#stopRequested = false;
    }
  }

  async #rotate(ctx: CallContext | undefined): Promise<RotationStatus> {
    const who = { caller: ctx?.caller, remote: ctx?.remoteAddress };
    const progress = await this.#beginOrResume(who);
    this.#progress = progress;
    const passed = await this.#rewrapAll(progress, who);
    // Stopped mid-way: the stored record still says running (it resumes at the next start).
    if (passed !== null) await this.#finish(passed, who);
    this.#inProgress = false;
    return this.status();
  }

  /** A new KEK version and a running rotation to it, or the interrupted rotation as stored. */
  async #beginOrResume(who: Who): Promise<RotationRecord> {
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
    const version = active + 1;
    const wrapped = await this.#deps.newKek(version, {
      op: 'rotate_kek',
      kekVersion: version,
      detail: `start: KEK version ${active} -> ${version}`,
      ...who,
    });
    const now = new Date().toISOString();
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
        this.#progress = progress;
        continue;
      }
      const rewraps = await this.#rewrapBatch(records, progress.target, who);
      const next: RotationRecord = {
        ...progress,
        cursor: last.keyId,
        done: Math.min(progress.total, progress.done + records.length),
      };
      await pendingCommit;
      // Status reports durable progress only: a batch counts once its transaction has committed.
      pendingCommit = registry.applyRewraps(rewraps, next).then(() => {
        this.#progress = next;
      });
      progress = next;
    }
  }

  /** Records completion and destroys the KEK versions no DEK version needs any more. */
  async #finish(progress: RotationRecord, who: Who): Promise<void> {
    const finished: RotationRecord = {
      ...progress,
      state: 'completed',
      done: progress.total,
      finishedAt: new Date().toISOString(),
    };
    const destroyed = await this.#deps.registry.finishRotation(finished);
    this.#progress = finished;
    await this.#deps.note({
      op: 'rotate_kek',
      kekVersion: finished.target,
      detail: `complete: ${finished.total} keys; destroyed KEK versions [${destroyed.join(',')}]`,
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
        const packed = new Uint8Array(slice.length * WRAPPED_KEY_BYTES);
        const deks: DekRef[] = slice.map(({ record, version }, i) => {
          packed.set(version.wrapped, i * WRAPPED_KEY_BYTES);
          return {
            keyId: record.keyId,
            keyVersion: version.v,
            kekVersion: version.kek,
            wrapped: packed.subarray(i * WRAPPED_KEY_BYTES, (i + 1) * WRAPPED_KEY_BYTES),
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
