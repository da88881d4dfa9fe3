/** Creating master keys, always inside a worker thread (see workers/keygen.ts). */
import { Piscina } from 'piscina';
import { kmsError } from '../errors.js';
import { workerFile } from './pool.js';

/**
 * Writes a new random master key (64 hex characters, mode 0600) to `file`, or to stdout when
 * `file` is null. Refuses to overwrite an existing file (CONFIG_INVALID).
 */
export async function generateMasterKey(file: string | null): Promise<void> {
  const pool = new Piscina({ filename: workerFile('keygen'), minThreads: 1, maxThreads: 1 });
  try {
    const result = (await pool.run({ out: file })) as { ok: boolean; code?: string };
    if (result.code === 'EEXIST')
      throw kmsError('CONFIG_INVALID', `${file} already exists; not overwriting a key`);
    if (!result.ok) throw kmsError('CONFIG_INVALID', `cannot write master key to ${file} (${result.code})`);
  } finally {
    await pool.destroy();
  }
}

export function generateMasterKeyFile(file: string): Promise<void> {
  return generateMasterKey(file);
}
