/** `progressdb-kms keygen`. */
import path from 'node:path';
import { kmsError } from '../../errors.js';
import { generateAuditSigningKey, generateMasterKey } from '../../kms/keygen.js';
import { report } from './common.js';

/**
 * `keygen [--out FILE]`: a new master key, written 0600 to FILE or printed.
 * `keygen --audit-signing-key FILE`: a new audit signing key pair, FILE (0600) and FILE.pub.
 */
export async function keygenCommand(opts: { out?: string; auditSigningKey?: string }): Promise<number> {
  try {
    if (opts.auditSigningKey !== undefined) {
      if (opts.out !== undefined)
        throw kmsError('CONFIG_INVALID', 'give --out or --audit-signing-key, not both');
      const file = path.resolve(opts.auditSigningKey);
      const { publicKeyFile, keyId } = await generateAuditSigningKey(file);
      process.stderr.write(
        `wrote a new audit signing key to ${file} (mode 0600; give it to the KMS only) and its public ` +
          `key to ${publicKeyFile} (give it to auditors); key id ${keyId}\n`,
      );
      return 0;
    }
    await generateMasterKey(opts.out === undefined ? null : path.resolve(opts.out));
    if (opts.out !== undefined)
      process.stderr.write(`wrote a new master key to ${path.resolve(opts.out)} (mode 0600)\n`);
    return 0;
  } catch (err) {
    return report(err);
  }
}
