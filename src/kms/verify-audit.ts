/** Audit log verification in a one-off worker: the audit key is derived there and stays there. */
import { Piscina } from 'piscina';
import type { MasterKeyRef, VerifyAuditResult, WorkerInit } from '../protocol.js';
import { fromWorkerError, workerFile } from './pool.js';

export async function runVerifyAudit(masterKey: MasterKeyRef, file: string): Promise<VerifyAuditResult> {
  const init: WorkerInit = {
    masterKey,
    dekCacheSize: 1,
    evictChannel: `progressdb-verify-${process.pid}`,
    auditFile: null,
    auditFsyncEachWrite: false,
    idleSpin: null,
  };
  const pool = new Piscina({
    filename: workerFile('crypto'),
    minThreads: 1,
    maxThreads: 1,
    workerData: init,
  });
  try {
    return (await pool.run({ type: 'verify-audit', path: file })) as VerifyAuditResult;
  } catch (err) {
    throw fromWorkerError(err);
  } finally {
    await pool.destroy();
  }
}
