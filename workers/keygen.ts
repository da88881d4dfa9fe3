/**
 * One-shot worker task that creates a master key: 32 random bytes, written as hex to a new file
 * with mode 0600 (never overwriting one), or to stdout when no file is given. Runs in a worker so
 * that even a process that creates its own development key never holds it on the main thread.
 * With `kind: 'audit-signing'` it creates an audit signing key instead (an Ed25519 seed, written
 * after its label, always to a file) and answers with the public key, which is not secret.
 */
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import sodium from 'sodium-native';
import {
  SIGNING_KEY_FILE_LABEL,
  SIGNING_PUBLIC_KEY_BYTES,
  SIGNING_SEED_BYTES,
} from '../src/audit-checkpoint.js';

interface KeygenTask {
  out: string | null;
  kind?: 'master' | 'audit-signing';
}

interface KeygenResult {
  ok: boolean;
  code?: string;
  /** The audit signing key's public key (raw, 32 bytes). */
  publicKey?: Uint8Array;
}

function writeNewFile(out: string, bytes: Uint8Array): void {
  const fd = fs.openSync(out, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
  try {
    fs.writeSync(fd, bytes);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

const HEX_DIGITS = Buffer.from('0123456789abcdef', 'latin1');

/** The seed and its file text live in locked memory; the hex is written byte by byte (no string). */
function generateSigningKey(out: string): KeygenResult {
  const label = Buffer.from(SIGNING_KEY_FILE_LABEL, 'latin1');
  const seed = sodium.sodium_malloc(SIGNING_SEED_BYTES);
  const text = sodium.sodium_malloc(label.length + SIGNING_SEED_BYTES * 2 + 1);
  const secretKey = sodium.sodium_malloc(sodium.crypto_sign_SECRETKEYBYTES);
  try {
    sodium.randombytes_buf(seed);
    text.set(label, 0);
    for (let i = 0; i < SIGNING_SEED_BYTES; i++) {
      const byte = seed[i] as number;
      text[label.length + 2 * i] = HEX_DIGITS[byte >> 4] as number;
      text[label.length + 2 * i + 1] = HEX_DIGITS[byte & 15] as number;
    }
    text[text.length - 1] = 0x0a;
    writeNewFile(out, text);
    const publicKey = new Uint8Array(SIGNING_PUBLIC_KEY_BYTES);
    sodium.crypto_sign_seed_keypair(publicKey, secretKey, seed);
    return { ok: true, publicKey };
  } finally {
    sodium.sodium_memzero(seed);
    sodium.sodium_memzero(text);
    sodium.sodium_memzero(secretKey);
  }
}

export default function generateKey({ out, kind = 'master' }: KeygenTask): KeygenResult {
  if (kind === 'audit-signing') {
    if (out === null) return { ok: false, code: 'no file' };
    try {
      return generateSigningKey(out);
    } catch (err) {
      return { ok: false, code: (err as NodeJS.ErrnoException).code ?? 'error' };
    }
  }
  const key = Buffer.alloc(32);
  const hex = Buffer.alloc(65);
  try {
    randomFillSync(key);
    hex.write(`${key.toString('hex')}\n`, 'latin1');
    if (out === null) {
      fs.writeSync(1, hex);
      return { ok: true };
    }
    writeNewFile(out, hex);
    return { ok: true };
  } catch (err) {
    return { ok: false, code: (err as NodeJS.ErrnoException).code ?? 'error' };
  } finally {
    key.fill(0);
    hex.fill(0);
  }
}
