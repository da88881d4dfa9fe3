/** Audit log verification in a one-off worker: the audit key is derived there and stays there. */
import { Piscina } from 'piscina';
import type { AuditHeadRecord } from '../audit-link.js';
import type { MasterKeyRef, VerifyAuditResult, WorkerInit } from '../protocol.js';
import { fromWorkerError, workerFile } from './pool.js';

/** `head` is the data directory registry's audit head, which the log must reach (null: none). */
export async function runVerifyAudit(
  masterKey: MasterKeyRef,
  file: string,
  head: AuditHeadRecord | null,
): Promise<VerifyAuditResult> {
  const init: WorkerInit = {
    masterKey,
    dekCacheSize: 1,
    evictChannel: `progressdb-verify-${process.pid}`,
    auditFile: null,
    auditFsyncEachWrite: false,
    auditLink: null,
    idleSpin: null,
  };
  const pool = new Piscina({
    filename: workerFile('crypto'),
    minThreads: 1,
    maxThreads: 1,
    workerData: init,
  });
  try {
    return (await pool.run({ type: 'verify-audit', path: file, head })) as VerifyAuditResult;
  } catch (err) {
    throw fromWorkerError(err);
  } finally {
    await pool.destroy();
  }
}
