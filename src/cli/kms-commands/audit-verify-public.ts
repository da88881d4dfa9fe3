/** `progressdb-kms audit verify --public-key FILE`: checks the checkpoints without the master key. */
import fs from 'node:fs';
import { parsePublicKey } from '../../audit-checkpoint.js';
import { kmsError } from '../../errors.js';
import { auditChainFiles } from '../../kms/audit-file.js';
import { Registry } from '../../kms/registry/index.js';
import { type PublicVerifyProblem, verifyAuditPublic } from '../../kms/verify-audit-public.js';
import { dataDirOf, report } from './common.js';

export interface PublicVerifyOptions {
  dataDir?: string;
  from?: string;
  /** Public key files (PEM or hex); several when the signing key was replaced. */
  publicKey: string[];
  /** commander's `--no-registry`: false checks the log alone (an archived copy, say). */
  registry?: boolean;
}

const LABELS: Record<PublicVerifyProblem, string> = {
  tampered: 'tampered',
  'wrong-key': 'wrong key',
  truncated: 'truncated',
  'no-checkpoints': 'no checkpoints',
  unreadable: 'unreadable',
};

function readPublicKey(file: string): Buffer {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw kmsError(
      'CONFIG_INVALID',
      `cannot read public key ${file} (${(err as NodeJS.ErrnoException).code})`,
    );
  }
  const key = parsePublicKey(text);
  if (key === null) {
    throw kmsError('CONFIG_INVALID', `${file} is not an Ed25519 public key (PEM or 64 hex characters)`);
  }
  return key;
}

/**
 * Prints `ok: …` (exit 0), or `FAILED (tampered|wrong key|truncated|…) …` with the file and line
 * where there is one (exit 1). Read-only, so it may run beside a live KMS.
 */
export async function auditVerifyPublicCommand(opts: PublicVerifyOptions): Promise<number> {
  try {
    const dataDir = dataDirOf(opts);
    const keys = opts.publicKey.map(readPublicKey);
    const files = auditChainFiles(dataDir, opts.from);
    const head = opts.registry === false ? null : (Registry.readAuditHead(dataDir) ?? null);
    const result = verifyAuditPublic(files, keys, head, opts.from !== undefined);
    if (result.ok) {
      process.stdout.write(
        `ok: ${result.checkpoints} checkpoints verified, covering ${result.linesCovered} of ${result.lines} lines ` +
          `in ${files.length === 1 ? files[0] : `${files.length} files in ${dataDir}`}\n`,
      );
      if (result.linesUncovered > 0) {
        process.stdout.write(
          `note: ${result.linesUncovered} lines come after their stream's last checkpoint: not covered yet, not checked\n`,
        );
      }
      if (head === null) {
        process.stdout.write(
          "note: without the registry's audit head, a cut-off end of the log cannot be seen\n",
        );
      }
      return 0;
    }
    const where = result.line === null ? '' : ` at ${result.file}:${result.line}`;
    process.stdout.write(`FAILED (${LABELS[result.problem ?? 'tampered']})${where}: ${result.reason}\n`);
    if (result.line !== null)
      process.stdout.write(`first bad line: ${result.line}\nin file: ${result.file}\n`);
    return 1;
  } catch (err) {
    return report(err);
  }
}
