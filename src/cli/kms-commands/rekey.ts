/** `progressdb-kms rekey`. */
import type { RegistryFlags } from '../../config/daemon-registry.js';
import { kmsError } from '../../errors.js';
import { createKms } from '../../kms/index.js';
import { type DataDirCommandOptions, dataDirOf, registryOf, report } from './common.js';

export interface RekeyFlags extends DataDirCommandOptions, RegistryFlags {
  newMasterKeyFile?: string;
  allowOpenKeyFile?: boolean;
  voteTimeout?: number;
}

/**
 * `rekey --new-master-key-file F [--data-dir D] [--master-key-file OLD] [registry flags]`: master
 * re-key. Opens the registry with the current master key (taking the data directory lock, so for
 * one node it refuses to run beside a live KMS), rewraps every KEK version under the new key in one
 * transaction, and is audited. Against a cluster's etcd registry it joins the cluster and puts the
 * re-key to its running replicas' vote (src/kms/rekey.ts): each must read the new key at the same
 * path before anything commits.
 */
export async function rekeyCommand(opts: RekeyFlags): Promise<number> {
  let kms: Awaited<ReturnType<typeof createKms>> | undefined;
  try {
    const newMasterKeyFile = opts.newMasterKeyFile;
    if (newMasterKeyFile === undefined) {
      throw kmsError(
        'CONFIG_INVALID',
        'give the new master key: --new-master-key-file F (progressdb-kms keygen makes one)',
      );
    }
    const registry = registryOf(opts);
    kms = await createKms({
      dataDir: dataDirOf(opts),
      masterKeyFile: opts.masterKeyFile,
      resumeRotation: false,
      ...(registry.url !== undefined && { ...registry, registry: registry.url }),
    });
    const result = await kms.rekeyMaster(
      {
        newMasterKeyFile,
        allowOpenKeyFile: opts.allowOpenKeyFile === true,
        ...(opts.voteTimeout !== undefined && { voteTimeoutMs: opts.voteTimeout * 1000 }),
      },
      { caller: 'progressdb-kms rekey' },
    );
    process.stdout.write(
      `re-keyed: ${result.kekVersions} KEK versions now wrapped under ${newMasterKeyFile}; ` +
        `${result.auditKeys} earlier audit keys kept for the log. Start the KMS with the new key: ` +
        'the old one is refused (MASTER_KEY_MISMATCH). Destroy every copy of the old key.\n',
    );
    return 0;
  } catch (err) {
    return report(err);
  } finally {
    await kms?.close();
  }
}
