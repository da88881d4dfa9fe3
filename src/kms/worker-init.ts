/** What each crypto worker of an embedded KMS starts with (WorkerInit, less its spin settings). */
import { randomBytes } from 'node:crypto';
import type { ResolvedKmsOptions } from '../config/library.js';
import { newKeyDirectory, type WorkerInit } from '../worker-abi/index.js';
import type { AuditFile } from './audit-file.js';
import type { AuditHeadKeeper } from './audit-head-keeper.js';
import type { Registry } from './registry/index.js';

/**
 * Entries of the key directory: as many as the workers cache keys (a key out of the directory is
 * sent as a DekRef instead), within bounds that keep its shared buffer between 96 KiB and 37 MiB.
 */
function keyDirectoryCapacity(dekCacheSize: number): number {
  return Math.min(Math.max(dekCacheSize, 256), 100_000);
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
