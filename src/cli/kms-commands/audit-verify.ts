/** `progressdb-kms audit verify`. */
import path from 'node:path';
import type { RegistryFlags } from '../../config/daemon-registry.js';
import { resolveMasterKeyRef } from '../../config/library.js';
import { AUDIT_FILE_NAME, auditChainFiles } from '../../kms/audit-file.js';
import { Registry } from '../../kms/registry/index.js';
import { readRegistryValue } from '../../kms/registry/open.js';
import { AUDIT_KEYS } from '../../kms/registry/records.js';
import { runVerifyAudit } from '../../kms/verify-audit.js';
import type { WrappedAuditKey } from '../../worker-abi/index.js';
import { type DataDirCommandOptions, dataDirOf, registryOf, report } from './common.js';

/**
 * `audit verify [--data-dir D] [--from FILE] [--registry etcd://... --cluster NAME]`: checks every
 * line's signature, sequence and chain over the rolled files and the live one, in order. Prints
 * the first bad line's file and number and exits 1, or the count verified and exits 0. Read-only,
 * so it may run beside a live KMS. A cluster replica's log needs its cluster's registry: a
 * re-key keeps the earlier audit keys there, not in the replica's data directory.
 */
export async function auditVerifyCommand(
  opts: DataDirCommandOptions & RegistryFlags & { from?: string },
): Promise<number> {
  try {
    const dataDir = dataDirOf(opts);
    const files = auditChainFiles(dataDir, opts.from);
    const masterKey = resolveMasterKeyRef({ masterKeyFile: opts.masterKeyFile });
    const head = Registry.readAuditHead(dataDir) ?? null;
    // The audit keys of the master keys this directory was re-keyed from, for its older streams.
    const auditKeys =
      ((await readRegistryValue(dataDir, registryOf(opts), AUDIT_KEYS)) as WrappedAuditKey[] | undefined) ??
      [];
    const result = await runVerifyAudit(masterKey, files, head, opts.from !== undefined, auditKeys);
    if (result.ok) {
      const first = path.basename(files[0] as string);
      const where =
        files.length === 1
          ? files[0]
          : `${files.length} files (${first} to ${AUDIT_FILE_NAME}) in ${dataDir}`;
      process.stdout.write(`ok: ${result.linesVerified} lines verified in ${where}\n`);
      if (head === null) {
        process.stdout.write(
          `note: ${dataDir} has no registry audit head; the log's end was not checked against it\n`,
        );
      }
      return 0;
    }
    const line = result.firstBadLine;
    const where =
      line === null ? '' : result.file === null ? ` at line ${line}` : ` at ${result.file}:${line}`;
    process.stdout.write(`FAILED${where}: ${result.reason}\n`);
    if (line !== null) process.stdout.write(`first bad line: ${line}\n`);
    if (result.file !== null) process.stdout.write(`in file: ${result.file}\n`);
    return 1;
  } catch (err) {
    return report(err);
  }
}
