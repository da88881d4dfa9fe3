/** Audit log verification in a one-off worker: the audit key is derived there and stays there. */
import { Piscina } from 'piscina';
import type { AuditHeadRecord } from '../audit-link.js';
import { DEFAULT_CIPHER } from '../format.js';
import {
  type MasterKeyRef,
  newMasterKeySwitch,
  type VerifyAuditResult,
  type WorkerInit,
  type WrappedAuditKey,
} from '../worker-abi/index.js';
import { runTask, workerFile } from './pool.js';

/** Options of verifyAudit(). */
export interface VerifyAuditOptions {
  /**
   * Start the chain at this file (a name or path of `kms-audit.log.NNNNNN` or the live file),
   * for when older rolled files were removed on purpose (expiry). Default: the oldest present,
   * which must begin the log's first session.
   */
  from?: string;
}

/** Init of a worker that runs one-off tasks: no DEKs to cache, no audit to write, no spinning. */
export function oneOffWorkerInit(masterKey: MasterKeyRef): WorkerInit {
  return {
    masterKey,
    dekCacheSize: 1,
    keyDirectory: null,
    cipher: DEFAULT_CIPHER,
    evictChannel: `progressdb-verify-${process.pid}`,
    auditFile: null,
    auditGeneration: null,
    auditFsyncEachWrite: false,
    masterKeySwitch: newMasterKeySwitch(),
    auditDataOps: 'each',
    auditLink: null,
    auditReplica: null,
    auditCheckpoints: null,
    idleSpin: null,
  };
}

/**
 * `files`: the audit chain in order (auditChainFiles). `head` is the data directory registry's
 * audit head, which the log must reach (null: none). `trimmed`: the chain starts at files[0].
 */
export async function runVerifyAudit(
  masterKey: MasterKeyRef,
  files: string[],
  head: AuditHeadRecord | null,
  trimmed = false,
  auditKeys: WrappedAuditKey[] = [],
): Promise<VerifyAuditResult> {
  const pool = new Piscina({
    filename: workerFile('crypto'),
    minThreads: 1,
    maxThreads: 1,
    workerData: oneOffWorkerInit(masterKey),
  });
  try {
    return await runTask<VerifyAuditResult>(pool, {
      type: 'verify-audit',
      paths: files,
      head,
      trimmed,
      auditKeys,
    });
  } finally {
    await pool.destroy();
  }
}
