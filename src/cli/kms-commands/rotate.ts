/** `progressdb-kms rotate`. */
import { createKms } from '../../kms/index.js';
import { type DataDirCommandOptions, dataDirOf, report } from './common.js';
import { Progress } from './progress.js';

/**
 * `rotate [--data-dir D]`: offline KEK rotation (or the completion of an interrupted one) with a
 * progress bar. Takes the data directory lock, so it refuses to run beside a live KMS.
 */
export async function rotateCommand(opts: DataDirCommandOptions): Promise<number> {
  let kms: Awaited<ReturnType<typeof createKms>> | undefined;
  try {
    kms = await createKms({
      dataDir: dataDirOf(opts),
      masterKeyFile: opts.masterKeyFile,
      resumeRotation: false,
    });
    const before = await kms.rotationStatus();
    const resuming = before.state === 'running';
    process.stderr.write(
      resuming
        ? `resuming the interrupted rotation to KEK version ${before.targetKekVersion}\n`
        : `rotating KEK ${before.kekId} from version ${before.activeKekVersion}\n`,
    );
    const progress = new Progress({ unit: 'keys' });
    const running = kms;
    const timer = setInterval(async () => {
      const status = await running.rotationStatus();
      progress.update(status.done, status.total);
    }, 200);
    let status: Awaited<ReturnType<typeof kms.rotateKek>>;
    try {
      status = await kms.rotateKek({ caller: 'progressdb-kms rotate' });
    } finally {
      clearInterval(timer);
    }
    progress.update(status.done, status.total);
    progress.end();
    process.stdout.write(
      `rotation complete: KEK version ${status.activeKekVersion} active, ${status.total} keys rewrapped; ` +
        `KEK versions kept: [${status.kekVersions.join(', ')}]\n`,
    );
    return 0;
  } catch (err) {
    return report(err);
  } finally {
    await kms?.close();
  }
}
