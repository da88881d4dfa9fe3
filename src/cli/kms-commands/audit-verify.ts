/** `progressdb-kms audit verify`. */
import path from 'node:path';
import { resolveMasterKeyRef } from '../../config/library.js';
import { AUDIT_FILE_NAME } from '../../kms/audit-file.js';
import { Registry } from '../../kms/registry/index.js';
import { runVerifyAudit } from '../../kms/verify-audit.js';
import { type DataDirCommandOptions, dataDirOf, report } from './common.js';

/**
 * `audit verify [--data-dir D]`: checks every line's signature, sequence and chain. Prints the
 * first bad line number and exits 1, or the count verified and exits 0. Read-only, so it may run
 * beside a live KMS.
 */
export async function auditVerifyCommand(opts: DataDirCommandOptions): Promise<number> {
  try {
    const dataDir = dataDirOf(opts);
    const file = path.join(dataDir, AUDIT_FILE_NAME);
    const masterKey = resolveMasterKeyRef({ masterKeyFile: opts.masterKeyFile });
    const head = Registry.readAuditHead(dataDir) ?? null;
    const result = await runVerifyAudit(masterKey, file, head);
    if (result.ok) {
      process.stdout.write(`ok: ${result.linesVerified} lines verified in ${file}\n`);
      if (head === null) {
        process.stdout.write(
          `note: ${dataDir} has no registry audit head; the log's end was not checked against it\n`,
        );
      }
      return 0;
    }
    const where = result.firstBadLine === null ? '' : ` at line ${result.firstBadLine}`;
    process.stdout.write(`FAILED${where}: ${result.reason}\n`);
    if (result.firstBadLine !== null) process.stdout.write(`first bad line: ${result.firstBadLine}\n`);
    return 1;
  } catch (err) {
    return report(err);
  }
}
