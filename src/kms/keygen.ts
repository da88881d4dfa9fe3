/** Creating master keys and audit signing keys, always inside a worker thread (see workers/keygen.ts). */
import fs from 'node:fs';
import { Piscina } from 'piscina';
import { publicKeyPem, signingKeyId } from '../audit-checkpoint.js';
import { kmsError } from '../errors.js';
import { workerFile } from './pool.js';

interface KeygenResult {
  ok: boolean;
  code?: string;
  publicKey?: Uint8Array;
}

async function runKeygen(task: {
  out: string | null;
  kind: 'master' | 'audit-signing';
}): Promise<KeygenResult> {
  const pool = new Piscina({ filename: workerFile('keygen'), minThreads: 1, maxThreads: 1 });
  try {
    return (await pool.run(task)) as KeygenResult;
  } finally {
    await pool.destroy();
  }
}

/**
 * Writes a new random master key (64 hex characters, mode 0600) to `file`, or to stdout when
 * `file` is null. Refuses to overwrite an existing file (CONFIG_INVALID).
 */
export async function generateMasterKey(file: string | null): Promise<void> {
  const result = await runKeygen({ out: file, kind: 'master' });
  if (result.code === 'EEXIST')
    throw kmsError('CONFIG_INVALID', `${file} already exists; not overwriting a key`);
  if (!result.ok) throw kmsError('CONFIG_INVALID', `cannot write master key to ${file} (${result.code})`);
}

export function generateMasterKeyFile(file: string): Promise<void> {
  return generateMasterKey(file);
}

/**
 * Writes a new audit signing key pair: the private key to `file` (mode 0600, made in a worker) and
 * the public key to `file.pub` (PEM, for auditors). Refuses to overwrite either. Returns the
 * public key file and the key id checkpoints will name.
 */
export async function generateAuditSigningKey(
  file: string,
): Promise<{ publicKeyFile: string; keyId: string }> {
  const publicKeyFile = `${file}.pub`;
  for (const existing of [file, publicKeyFile]) {
    if (fs.existsSync(existing)) {
      throw kmsError('CONFIG_INVALID', `${existing} already exists; not overwriting a key`);
    }
  }
  const result = await runKeygen({ out: file, kind: 'audit-signing' });
  if (result.code === 'EEXIST')
    throw kmsError('CONFIG_INVALID', `${file} already exists; not overwriting a key`);
  if (!result.ok || result.publicKey === undefined) {
    throw kmsError('CONFIG_INVALID', `cannot write the audit signing key to ${file} (${result.code})`);
  }
  const publicKey = Buffer.from(result.publicKey);
  fs.writeFileSync(publicKeyFile, publicKeyPem(publicKey), { flag: 'wx', mode: 0o644 });
  return { publicKeyFile, keyId: signingKeyId(publicKey) };
}
