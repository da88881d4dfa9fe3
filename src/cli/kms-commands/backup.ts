/** `progressdb-kms backup` and `restore`. */
import type { RegistryFlags } from '../../config/daemon-registry.js';
import { resolveMasterKeyRef } from '../../config/library.js';
import { kmsError } from '../../errors.js';
import { backupRegistry, restoreRegistry } from '../../kms/registry/backup.js';
import { registryOf, report } from './common.js';

export interface BackupFlags extends RegistryFlags {
  dataDir?: string;
  out?: string;
}

/**
 * `backup --data-dir D --out FILE` (or `--registry etcd://... --cluster NAME`): a consistent
 * snapshot of the registry, taken while the KMS serves; wrapped material only.
 */
export async function backupCommand(flags: BackupFlags): Promise<number> {
  try {
    if (flags.out === undefined)
      throw kmsError('CONFIG_INVALID', 'give the backup file to write: --out FILE');
    const header = await backupRegistry({
      ...(flags.dataDir !== undefined && { dataDir: flags.dataDir }),
      registry: registryOf(flags),
      out: flags.out,
    });
    const { counts } = header;
    const from =
      header.source.kind === 'lmdb'
        ? header.source.dataDir
        : `${header.source.prefix} at revision ${header.source.revision}`;
    process.stdout.write(
      `backed up ${from} to ${flags.out}: KEK ${header.kekId} (active version ${header.activeKekVersion}), ` +
        `${counts.keks} KEK versions, ${counts.deks} DEKs, ${counts.threads} threads.\n` +
        'It resurrects every key destroyed after it was taken: expire it on your deletion schedule.\n',
    );
    return 0;
  } catch (err) {
    return report(err);
  }
}

export interface RestoreFlags extends RegistryFlags {
  in?: string;
  dataDir?: string;
  masterKeyFile?: string;
}

/**
 * `restore --in FILE --data-dir NEW --master-key-file K` (or `--registry etcd://... --cluster
 * NAME`): into a new data directory or an empty cluster prefix only.
 */
export async function restoreCommand(flags: RestoreFlags): Promise<number> {
  try {
    if (flags.in === undefined)
      throw kmsError('CONFIG_INVALID', 'give the backup file to restore: --in FILE');
    const result = await restoreRegistry({
      inFile: flags.in,
      ...(flags.dataDir !== undefined && { dataDir: flags.dataDir }),
      registry: registryOf(flags),
      masterKey: resolveMasterKeyRef({ masterKeyFile: flags.masterKeyFile }),
    });
    const { counts, header } = result;
    process.stdout.write(
      `restored ${flags.in} (taken ${header.createdAt}) into ${result.target}: KEK ${header.kekId} ` +
        `(active version ${header.activeKekVersion}), ${counts.keks} KEK versions, ${counts.deks} DEKs, ` +
        `${counts.threads} threads; the master key unwraps its KEK.\n`,
    );
    return 0;
  } catch (err) {
    return report(err);
  }
}
