/** `progressdb-kms rotate`. */
import { createKms } from '../../kms/index.js';
import { type DataDirCommandOptions, dataDirOf, report } from './common.js';

function progressLine(done: number, total: number): string {
  const width = 30;
  const ratio = total === 0 ? 1 : Math.min(1, done / total);
  const filled = Math.round(ratio * width);
  return `\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(ratio * 100).toFixed(1)}% ${done}/${total}`;
}

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
    const tty = process.stderr.isTTY === true;
    const running = kms;
    const timer = setInterval(async () => {
      const status = await running.rotationStatus();
      if (tty) process.stderr.write(progressLine(status.done, status.total));
    }, 200);
    let status: Awaited<ReturnType<typeof kms.rotateKek>>;
    try {
      status = await kms.rotateKek({ caller: 'progressdb-kms rotate' });
    } finally {
      clearInterval(timer);
    }
    if (tty) process.stderr.write(`${progressLine(status.done, status.total)}\n`);
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
