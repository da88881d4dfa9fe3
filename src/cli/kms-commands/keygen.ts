/** `progressdb-kms keygen`. */
import path from 'node:path';
import { generateMasterKey } from '../../kms/keygen.js';
import { report } from './common.js';

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
