/** What each crypto worker of an embedded KMS starts with (WorkerInit, less its spin settings). */
import { randomBytes } from 'node:crypto';
import type { ResolvedKmsOptions } from '../config/library.js';
import { newKeyDirectory, type WorkerInit } from '../worker-abi/index.js';
import type { AuditFile } from './audit-file.js';
import type { AuditHeadKeeper } from './audit-head-keeper.js';
import { DEK_RECORD_CACHE_ENTRIES, type Registry } from './registry/index.js';

/**
 * Entries of the key directory: one for each DEK record the registry caches decoded (a key out of
 * the directory is sent as a DekRef instead), or for each key the workers cache if that is more,
 * up to 100,000 (a 37 MiB shared buffer, its pages touched only as entries fill). With 100,000
 * thread keys, a directory the size of the worker cache (10,000) churned: decrypt measured ~80k ->
 * ~96k ops/s with 50,000 entries.
 */
function keyDirectoryCapacity(dekCacheSize: number): number {
  return Math.min(Math.max(dekCacheSize, DEK_RECORD_CACHE_ENTRIES), 100_000);
}

export function cryptoWorkerInit(
  opts: ResolvedKmsOptions,
  masterKeySwitch: SharedArrayBuffer,
  auditFile: AuditFile | null,
  auditHeads: AuditHeadKeeper | null,
  registry: Registry,
): Omit<WorkerInit, 'idleSpin'> {
  return {
    masterKey: opts.masterKey,
    masterKeySwitch,
    dekCacheSize: opts.dekCacheSize,
    keyDirectory: newKeyDirectory(keyDirectoryCapacity(opts.dekCacheSize)),
    cipher: opts.cipher,
    evictChannel: `progressdb-kms-${process.pid}-${randomBytes(6).toString('hex')}`,
    auditFile: auditFile === null ? null : auditFile.path,
    auditGeneration: auditFile === null ? null : auditFile.generation,
    auditFsyncEachWrite: opts.auditFsyncMs === 0,
    auditDataOps: opts.auditDataOps,
    auditLink: auditHeads?.linkFields ?? null,
    auditReplica: registry.cluster?.replicaId ?? null,
    auditCheckpoints: auditFile === null ? null : opts.auditCheckpoints,
  };
}
