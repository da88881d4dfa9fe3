/**
 * The `progressdb-kms` sub-commands that work on a data directory directly: keygen, audit verify
 * and offline rotation. Each returns the process exit code and prints its own messages; CLI
 * wiring lives in src/cli/progressdb-kms.ts.
 */
import path from 'node:path';
import { givenKmsDataDir, resolveMasterKeyRef } from '../config/library.js';
import { kmsError, toCodedError } from '../errors.js';
import { AUDIT_FILE_NAME } from './audit-file.js';
import { createKms } from './index.js';
import { generateMasterKey } from './keygen.js';
import { Registry } from './registry/index.js';
import { runVerifyAudit } from './verify-audit.js';

export interface DataDirCommandOptions {
  /** Else PROGRESSDB_KMS_DATA_DIR, as for `serve`. */
  dataDir?: string;
  masterKeyFile?: string;
}

function dataDirOf(opts: DataDirCommandOptions): string {
  const dir = givenKmsDataDir(opts.dataDir);
  if (dir === undefined) {
    throw kmsError('CONFIG_INVALID', 'no data directory: pass --data-dir or set PROGRESSDB_KMS_DATA_DIR');
  }
  return path.resolve(dir);
}

function report(err: unknown): number {
  const coded = toCodedError(err);
  process.stderr.write(`progressdb-kms: ${coded.code}: ${coded.message}\n`);
  return 1;
}

/** `keygen [--out FILE]`: a new master key, written 0600 to FILE or printed. */
export async function keygenCommand(opts: { out?: string }): Promise<number> {
  try {
    await generateMasterKey(opts.out === undefined ? null : path.resolve(opts.out));
    if (opts.out !== undefined)
      process.stderr.write(`wrote a new master key to ${path.resolve(opts.out)} (mode 0600)\n`);
    return 0;
  } catch (err) {
    return report(err);
  }
}

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
    const timer = setInterval(async () => {
      const status = await kms!.rotationStatus();
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
