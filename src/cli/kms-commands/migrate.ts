/** `progressdb-kms migrate`: a single-node registry copied into an etcd cluster prefix. */
import type { RegistryFlags } from '../../config/daemon-registry.js';
import { kmsError } from '../../errors.js';
import { migrateRegistry } from '../../kms/registry/migrate.js';
import { registryOf, report } from './common.js';
import { Progress } from './progress.js';

export interface MigrateFlags extends RegistryFlags {
  fromDataDir?: string;
}

/**
 * `migrate --from-data-dir D --registry etcd://...`: refuses a non-empty target and a source with
 * a rotation in progress; an interrupted run is finished by running it again.
 */
export async function migrateCommand(flags: MigrateFlags): Promise<number> {
  try {
    if (flags.fromDataDir === undefined) {
      throw kmsError('CONFIG_INVALID', 'give the single-node data directory to copy: --from-data-dir D');
    }
    const registry = registryOf(flags);
    const progress = new Progress({ unit: 'records' });
    const result = await migrateRegistry({
      fromDataDir: flags.fromDataDir,
      registry,
      onProgress: (copied, total) => progress.update(copied, total),
    });
    progress.end();
    const { counts } = result;
    process.stdout.write(
      `${result.resumed ? 'finished the interrupted migration' : 'migrated'} ${result.from} into ${result.prefix}: ` +
        `KEK ${result.kekId} (active version ${result.activeKekVersion}), ${counts['kek/']} KEK versions, ` +
        `${counts['dek/']} DEKs, ${counts['thread/']} threads; counts checked in etcd.\n` +
        `Start the replicas with --registry and the same master key; do not start a single-node KMS on ${result.from} again (its keys would drift from the cluster's).\n`,
    );
    return 0;
  } catch (err) {
    return report(err);
  }
}
