import fs from 'node:fs';
import path from 'node:path';
import type {
  CallContext,
  DecryptItem,
  DekInfo,
  DestroyResult,
  EncryptItem,
  EncryptResult,
  ItemResult,
  Kms,
  KmsHealth,
  RotationStatus,
  VerifyAuditResult,
} from '../api/index.js';
import { type KmsOptions, type ResolvedKmsOptions, resolveKmsOptions } from '../config/library.js';
import { kmsError, toCodedError } from '../errors.js';
import { type Logger, silentLogger } from '../log.js';
import type {
  MasterKeyRef,
  NewKekResult,
  NewKekTask,
  RekeyMasterResult,
  WorkerTask,
} from '../worker-abi/index.js';
import { newMasterKeySwitch } from '../worker-abi/index.js';
import { AuditCheckpointRounds } from './audit-checkpoint-rounds.js';
import { AUDIT_FILE_NAME, AuditFile, auditChainFiles } from './audit-file.js';
import { AuditHeadKeeper } from './audit-head-keeper.js';
import { RekeyFollower } from './cluster-rekey-follower.js';
import { DataPlane } from './data-plane.js';
import { dropsKeyMaterial } from './dek-versions.js';
import { DeletionSweep } from './deletion-sweep.js';
import { type DirLock, lockDataDir } from './dir-lock.js';
import type { EmbeddedKmsHandle, RekeyMasterOptions } from './handle.js';
import { KekRefs } from './kek-refs.js';
import { keyMemoryWarner } from './key-memory-warning.js';
import { KeyOps } from './key-ops.js';
import { OpQueue } from './op-queue.js';
import { CryptoPool } from './pool.js';
import { type KekMeta, type Registry, ROTATION_LOCK } from './registry/index.js';
import { openRegistry } from './registry/open.js';
import { type RekeyDeps, type RekeyResult, rekeyMaster, rekeyTarget } from './rekey.js';
import { KekRotation } from './rotation.js';
import { activeKekOf, RotationSchedule } from './rotation-schedule.js';
import { startUp } from './startup.js';
import type { VerifyAuditOptions } from './verify-audit.js';
import { cryptoWorkerInit } from './worker-init.js';

export type { KmsOptions } from '../config/library.js';
export { AUDIT_FILE_NAME } from './audit-file.js';
export { MAX_AAD_BYTES, MAX_PLAINTEXT_BYTES } from './validate-args.js';

/** Before the first KEK exists (start-up only). */
const NO_KEK: KekMeta = { kekId: '', activeVersion: 0, createdAt: '' };

class EmbeddedKms implements Kms {
  readonly #opts: ResolvedKmsOptions;
  readonly #log: Logger;
  readonly #registry: Registry;
  readonly #pool: CryptoPool;
  readonly #auditFile: AuditFile | null;
  /** Links this session's audit streams to the last one (null with audit off). */
  readonly #auditHeads: AuditHeadKeeper | null;
  /** Checkpoints idle workers' streams (with an audit signing key only). */
  readonly #checkpointRounds: AuditCheckpointRounds | null;
  readonly #lock: DirLock;
  readonly #kekRefs: KekRefs;
  /** The master key the workers use now (a re-key switches it: master-key-switch.ts). */
  #masterKey: MasterKeyRef;
  readonly #masterKeySwitch = newMasterKeySwitch();
  readonly #queue: OpQueue;
  readonly #data: DataPlane;
  readonly #keys: KeyOps;
  #rotation!: KekRotation;
  #closed = false;
  readonly #stopWatching: (() => void)[] = [];
  /** Scheduled KEK rotation (kekRotationPeriod), when configured. */
  #schedule: RotationSchedule | null = null;
  /** Destroys the keys whose deletion window has ended (with background work on). */
  #sweep: DeletionSweep | null = null;
  /** The last DEK count health() read (a replica cut off from etcd reports it). */
  #dekCount = 0;
  #closing: Promise<void> | null = null;

  constructor(
    opts: ResolvedKmsOptions,
    log: Logger,
    registry: Registry,
    auditFile: AuditFile | null,
    lock: DirLock,
  ) {
    this.#opts = opts;
    this.#masterKey = opts.masterKey;
    this.#log = log;
    this.#registry = registry;
    this.#auditFile = auditFile;
    this.#lock = lock;
    this.#kekRefs = new KekRefs(registry);
    const auditHeads = auditFile === null ? null : new AuditHeadKeeper(registry, log);
    this.#auditHeads = auditHeads;
    if (auditHeads !== null) auditFile?.onFlush(auditHeads.beforeFlush);
    this.#pool = new CryptoPool({
      threads: opts.poolSize,
      maxBatch: opts.maxBatch,
      idleSpinUs: opts.idleSpinUs,
      init: cryptoWorkerInit(opts, this.#masterKeySwitch, auditFile, auditHeads, registry),
      kekRef: (version) => this.#kekRefs.get(version),
      onKeyMemory: keyMemoryWarner(this.#log),
      onAudit: (failed, head, checkpoint) => {
        if (failed) {
          this.#auditFile?.fail('a worker could not append to the audit log');
          return;
        }
        this.#auditHeads?.report(head, checkpoint);
        this.#auditFile?.markDirty();
      },
      activeKekVersion: () => this.#kek.activeVersion,
    });
    const checkpoints = auditFile === null ? null : opts.auditCheckpoints;
    this.#checkpointRounds =
      auditHeads === null || checkpoints === null
        ? null
        : new AuditCheckpointRounds({
            checkpointAll: () => this.#pool.checkpointAll(),
            ...checkpoints,
            heads: auditHeads,
          });
    // Every destroy leaves the workers here: this process's own (the store reports a commit before
    // it resolves) and, in a cluster, other replicas'.
    auditFile?.waitForTasksWith(() => this.#pool.settled());
    registry.onDekChange((keyId, record) => {
      if (dropsKeyMaterial(record)) this.#pool.evict(keyId);
    });
    this.#queue = new OpQueue(this.#pool, auditFile, opts.audit, () => this.#closed);
    this.#data = new DataPlane(this.#queue, registry, () => this.#assertOpen());
    this.#keys = new KeyOps({
      queue: this.#queue,
      registry,
      kek: () => this.#kek,
      assertOpen: () => {
        this.#assertOpen();
        registry.assertServing();
      },
      isClosed: () => this.#closed,
      deletionWindowMs: opts.deletionWindowMs,
      now: () => opts.clock.now(),
    });
  }

  /** The KEK metadata as the registry holds it now: new keys follow another replica's rotation at once. */
  get #kek(): KekMeta {
    return this.#registry.kekMeta() ?? NO_KEK;
  }

  /** Proves the master key (or makes the first KEK), then sets up and perhaps resumes rotation. */
  async start(): Promise<void> {
    await startUp({
      dataDir: this.#opts.dataDir,
      log: this.#log,
      registry: this.#registry,
      pool: this.#pool,
      auditFile: this.#auditFile,
      auditHeads: this.#auditHeads,
      newKek: (task) => this.#runAudited<NewKekResult>(task),
      note: (audit) => this.#queue.note(audit),
      kekRef: (version) => this.#kekRefs.get(version),
    });
    this.#checkpointRounds?.start();
    // In a cluster: takes part in the master re-keys other processes propose.
    const follower = RekeyFollower.forCluster(this.#rekeyDeps());
    if (follower !== null) {
      this.#stopWatching.push(() => follower.stop());
      await follower.start();
    }
    this.#rotation = new KekRotation({
      registry: this.#registry,
      pool: this.#pool,
      batchSize: this.#opts.rotationBatchSize,
      kekId: () => this.#kek.kekId,
      newKek: async (version, audit) => {
        const task: NewKekTask = { type: 'new-kek', kekId: this.#kek.kekId, version, audit };
        return this.#runAudited<NewKekResult>(task);
      },
      note: (audit) => this.#queue.note(audit),
      now: () => this.#opts.clock.now(),
    });
    if (!this.#opts.resumeRotation) return;
    this.#sweep = new DeletionSweep({
      clock: this.#opts.clock,
      windowMs: this.#opts.deletionWindowMs,
      registry: this.#registry,
      destroyIfDue: (keyId) => this.#keys.destroyIfDue(keyId),
      log: this.#log,
    });
    this.#sweep.start();
    const periodMs = this.#opts.kekRotationPeriodMs;
    if (periodMs !== null) {
      const schedule = new RotationSchedule({
        periodMs,
        clock: this.#opts.clock,
        activeKek: activeKekOf(this.#registry),
        rotate: (version) => this.#rotation.run({ caller: 'kms-schedule' }, { onlyIfActive: version }),
        log: this.#log,
      });
      this.#schedule = schedule;
      schedule.start();
      this.#stopWatching.push(() => schedule.stop());
    }
    if (this.#rotation.interrupted) this.#resumeRotation('kms-startup');
    // In a cluster, a rotation whose replica died (its lease, and the lock, lapsed) is resumed here.
    const unwatch = this.#registry.cluster?.onUnlocked(ROTATION_LOCK, () => {
      if (this.#rotation.interrupted && !this.#rotation.running && !this.#closed)
        this.#resumeRotation('kms-takeover');
    });
    if (unwatch !== undefined) this.#stopWatching.push(unwatch);
  }

  #resumeRotation(caller: string): void {
    this.#log.warn('resuming an interrupted KEK rotation');
    this.#rotation.run({ caller }).catch((err) => {
      this.#log.error(
        { code: toCodedError(err).code },
        'resumed KEK rotation failed; it will resume on the next call',
      );
    });
  }

  /** Runs a single task that writes its own audit line: that line counts like a batch's. */
  async #runAudited<T extends Pick<NewKekResult, 'auditHead' | 'auditCheckpoint'>>(
    task: WorkerTask,
  ): Promise<T> {
    const result = await this.#pool.run<T>(task);
    this.#auditHeads?.report(result.auditHead, result.auditCheckpoint);
    this.#auditFile?.markDirty();
    return result;
  }

  // --- create / get / key versions: the control plane (key-ops.ts) -------------------------

  /** After close() the registry is closed too: every call fails with NOT_READY, never an LMDB error. */
  #assertOpen(): void {
    if (this.#closed) throw kmsError('NOT_READY', 'the KMS is closed');
  }

  createDekForThread(threadId: string, ctx?: CallContext): Promise<DekInfo> {
    return this.#keys.createDekForThread(threadId, ctx);
  }

  getWrappedDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    return this.#keys.getWrappedDek(keyId, ctx);
  }

  rewrapDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    return this.#keys.rewrapDek(keyId, ctx);
  }

  rotateDek(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    return this.#keys.rotateDek(keyId, ctx);
  }

  destroyDekVersionsBefore(
    keyId: string,
    keepFromVersion: number,
    ctx?: CallContext,
  ): Promise<DestroyResult> {
    return this.#keys.destroyDekVersionsBefore(keyId, keepFromVersion, ctx);
  }

  destroyDek(keyId: string, ctx?: CallContext): Promise<DestroyResult> {
    return this.#keys.destroyDek(keyId, ctx);
  }

  cancelDeletion(keyId: string, ctx?: CallContext): Promise<DekInfo> {
    return this.#keys.cancelDeletion(keyId, ctx);
  }

  // --- encrypt / decrypt: the data plane ------------------------------------------------------

  encrypt(keyId: string, plaintext: Uint8Array, aad?: Uint8Array, ctx?: CallContext): Promise<EncryptResult> {
    return this.#data.encrypt(keyId, plaintext, aad, ctx);
  }

  decrypt(keyId: string, ciphertext: Uint8Array, aad?: Uint8Array, ctx?: CallContext): Promise<Buffer> {
    return this.#data.decrypt(keyId, ciphertext, aad, ctx);
  }

  reencrypt(
    keyId: string,
    ciphertext: Uint8Array,
    aad?: Uint8Array,
    ctx?: CallContext,
  ): Promise<EncryptResult> {
    return this.#data.reencrypt(keyId, ciphertext, aad, ctx);
  }

  encryptBatch(items: readonly EncryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.#data.encryptBatch(items, ctx);
  }

  reencryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.#data.reencryptBatch(items, ctx);
  }

  decryptBatch(items: readonly DecryptItem[], ctx?: CallContext): Promise<ItemResult<Buffer>[]> {
    return this.#data.decryptBatch(items, ctx);
  }

  // --- KEK rotation ------------------------------------------------------------------------

  async rotateKek(ctx?: CallContext): Promise<RotationStatus> {
    if (this.#closed) throw kmsError('NOT_READY', 'the KMS is closed');
    this.#registry.assertServing();
    return this.#rotation.run(ctx);
  }

  async startKekRotation(ctx?: CallContext): Promise<RotationStatus> {
    if (this.#closed) throw kmsError('NOT_READY', 'the KMS is closed');
    this.#registry.assertServing();
    const running = this.#rotation.run(ctx);
    running.catch((err) => {
      this.#log.error(
        { code: toCodedError(err).code },
        'KEK rotation failed; it will resume on the next call',
      );
    });
    // Running from this moment, even while the new KEK is still being made (see KekRotation).
    return this.#rotation.status();
  }

  async rotationStatus(): Promise<RotationStatus> {
    this.#assertOpen();
    return this.#rotation.status();
  }

  async health(): Promise<KmsHealth> {
    this.#assertOpen();
    const replica = this.#registry.cluster?.status();
    const serving = replica?.serving ?? true;
    // A replica cut off from etcd answers at once with the last count, rather than wait for etcd.
    if (serving) this.#dekCount = await this.#registry.dekCount().catch(() => this.#dekCount);
    const keyMemory = this.#pool.keyMemory();
    return {
      ok: !this.#closed && !(this.#auditFile?.failed ?? false) && serving,
      mode: 'embedded',
      kekId: this.#kek.kekId,
      activeKekVersion: this.#kek.activeVersion,
      dekCount: this.#dekCount,
      poolThreads: this.#pool.threads,
      queueDepth: this.#pool.queueDepth,
      rotation: this.#rotation.status(),
      ...(this.#schedule !== null && { nextRotationDueAt: this.#schedule.nextDueAt() }),
      ...(replica !== undefined && { replica }),
      ...(keyMemory !== undefined && { keyMemory }),
    };
  }

  /**
   * Verifies this data directory's audit log inside a worker: the rolled files and the live one,
   * as one chain. `from` (a file of the chain) starts it there, the older files having expired.
   */
  async verifyAudit(options: VerifyAuditOptions = {}): Promise<VerifyAuditResult> {
    this.#assertOpen();
    const paths = auditChainFiles(this.#opts.dataDir, options.from);
    return this.#pool.run<VerifyAuditResult>({
      type: 'verify-audit',
      paths,
      trimmed: options.from !== undefined,
      head: this.#registry.auditHead() ?? null,
      auditKeys: await this.#registry.auditKeys(),
    });
  }

  async rekeyMaster(options: RekeyMasterOptions, ctx?: CallContext): Promise<RekeyResult> {
    this.#assertOpen();
    return rekeyMaster(this.#rekeyDeps(), rekeyTarget(options), ctx, options.voteTimeoutMs);
  }

  /** What a master re-key changes here: this process's own (rekeyMaster) or another's (RekeyFollower). */
  #rekeyDeps(): RekeyDeps {
    return {
      registry: this.#registry,
      pool: this.#pool,
      queue: this.#queue,
      log: this.#log,
      masterKeySwitch: this.#masterKeySwitch,
      current: () => this.#masterKey,
      adopt: (ref) => {
        this.#masterKey = ref;
      },
      kekRef: (version) => this.#kekRefs.get(version),
      runInWorker: (task) => this.#runAudited<RekeyMasterResult>(task),
    };
  }

  /**
   * Opens `kms-audit.log` anew (SIGHUP, after logrotate renamed it): new lines go to the new
   * file, each stream's chain continuing there. False with audit off or if it cannot be opened.
   */
  reopenAuditLog(): boolean {
    if (this.#closed || this.#auditFile === null) return false;
    const reopened = this.#auditFile.reopen();
    if (reopened) this.#log.info(`audit log reopened: ${this.#auditFile.path}`);
    return reopened;
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    for (const unwatch of this.#stopWatching.splice(0)) unwatch();
    await this.#sweep?.stop();
    await this.#rotation?.stop();
    await this.#pool.idle();
    let stopped = false;
    const stopLine = this.#opts.audit && !(this.#auditFile?.failed ?? true);
    // Every stream checkpointed first, so that the stop line names their checkpoints' ends.
    await this.#checkpointRounds?.stop(stopLine).catch(() => {});
    if (stopLine) {
      // The stop line names every stream's end, so no stream of this session can be cut unseen.
      const heads = this.#auditHeads?.stopHeads();
      stopped = await this.#queue.note({ op: 'stop', detail: `pid ${process.pid}`, heads }).then(
        () => true,
        () => false,
      );
    }
    this.#closed = true;
    const { workers, zeroed } = await this.#pool.close();
    // Not expected: workers that did not answer are stopped anyway, and their memory freed unzeroed.
    if (zeroed < workers)
      this.#log.warn(`only ${zeroed} of ${workers} crypto workers confirmed zeroing their keys`);
    this.#auditFile?.close();
    // Sealed only once the stop line is on disk (close fsyncs).
    if (stopped && !(this.#auditFile?.failed ?? true)) {
      this.#auditHeads?.seal();
    }
    await this.#registry.close();
    this.#lock.release();
  }

  /** Used when start-up fails half-way: release everything without writing more. */
  async abort(): Promise<void> {
    this.#closed = true;
    await this.#checkpointRounds?.stop(false);
    await this.#pool.close().catch(() => {});
    this.#auditFile?.close();
    await this.#registry.close().catch(() => {});
    this.#lock.release();
  }
}

export type { EmbeddedKmsHandle, RekeyMasterOptions, VerifyAuditOptions } from './handle.js';

/**
 * Opens the KMS on a data directory. Fails (and releases everything) with a clear CodedError when
 * the directory is locked, the audit log is not writable, or the master key is missing, malformed
 * or does not match the stored KEK. Nothing stored is changed by a failed start.
 */
export async function createKms(options: KmsOptions = {}): Promise<EmbeddedKmsHandle> {
  const opts = resolveKmsOptions(options);
  const log = options.logger ?? silentLogger;
  fs.mkdirSync(opts.dataDir, { recursive: true, mode: 0o700 });
  const lock = lockDataDir(opts.dataDir);
  let auditFile: AuditFile | null = null;
  let registry: Registry | null = null;
  try {
    auditFile = opts.audit
      ? AuditFile.open(path.join(opts.dataDir, AUDIT_FILE_NAME), {
          fsyncMs: opts.auditFsyncMs,
          maxBytes: opts.auditMaxBytes,
          warn: (message) => log.warn(message),
        })
      : null;
    registry = await openRegistry(opts.dataDir, opts.registry, {
      onServingChange: (serving, why) => {
        if (serving) log.warn(`this KMS replica serves again: ${why}`);
        else log.error(`this KMS replica stopped serving (REGISTRY_UNAVAILABLE): ${why}`);
      },
    });
  } catch (err) {
    auditFile?.close();
    lock.release();
    throw toCodedError(err);
  }
  const kms = new EmbeddedKms(opts, log, registry, auditFile, lock);
  try {
    await kms.start();
  } catch (err) {
    await kms.abort();
    const coded = toCodedError(err);
    // An audit write failing during start-up means the log is not writable.
    throw coded.code === 'AUDIT_WRITE_FAILED' ? kmsError('AUDIT_UNWRITABLE', coded.message) : coded;
  }
  return kms;
}

export { generateMasterKey, generateMasterKeyFile } from './keygen.js';
