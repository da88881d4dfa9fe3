/** `progressdb-kms cancel-deletion`. */
import { kmsError } from '../../errors.js';
import { createKms } from '../../kms/index.js';
import { type DataDirCommandOptions, dataDirOf, report } from './common.js';

export interface CancelDeletionFlags extends DataDirCommandOptions {
  keyId?: string;
}

/**
 * `cancel-deletion --key-id K [--data-dir D]`: restores a key pending deletion, offline like
 * `rotate` (it takes the data directory lock); a running daemon does the same on
 * POST /cancel_deletion. Audited as the command.
 */
export async function cancelDeletionCommand(opts: CancelDeletionFlags): Promise<number> {
  let kms: Awaited<ReturnType<typeof createKms>> | undefined;
  try {
    if (opts.keyId === undefined) throw kmsError('CONFIG_INVALID', 'give the key to restore: --key-id K');
    // resumeRotation off: no background work, so no sweep destroys anything during the command.
    kms = await createKms({
      dataDir: dataDirOf(opts),
      masterKeyFile: opts.masterKeyFile,
      resumeRotation: false,
    });
    const dek = await kms.cancelDeletion(opts.keyId, { caller: 'progressdb-kms cancel-deletion' });
    process.stdout.write(
      `deletion of key ${dek.keyId} (thread ${dek.threadId}) cancelled: key version ${dek.keyVersion} is usable again\n`,
    );
    return 0;
  } catch (err) {
    return report(err);
  } finally {
    await kms?.close();
  }
}
