/**
 * The audit signing key (Ed25519), worker-only like the master key: the main thread holds only its
 * file's path. The file is read into locked memory (master-key.ts readKeyFile) and its hex decoded
 * byte by byte, never through a JS string; the seed and the expanded secret key live in
 * sodium_malloc memory, and the raw file bytes and the seed are zeroed once the key is expanded.
 */
import sodium from 'sodium-native';
import {
  SIGNATURE_BYTES,
  SIGNING_KEY_FILE_LABEL,
  SIGNING_PUBLIC_KEY_BYTES,
  SIGNING_SEED_BYTES,
  signingKeyId,
} from '../src/audit-checkpoint.js';
import type { AuditSigningKeyRef } from '../src/worker-abi/index.js';
import { WorkerFault } from './fault.js';
import { decodeHexKey, type KeyFileCodes, readKeyFile } from './master-key.js';

const CODES: KeyFileCodes = {
  missing: 'AUDIT_SIGNING_KEY_INVALID',
  invalid: 'AUDIT_SIGNING_KEY_INVALID',
  open: 'AUDIT_SIGNING_KEY_INVALID',
};

const LABEL = Buffer.from(SIGNING_KEY_FILE_LABEL, 'latin1');

export class AuditSigner {
  readonly #secretKey: Buffer;
  readonly publicKey: Buffer;
  /** The id checkpoints name their key by (signingKeyId of the public key). */
  readonly keyId: string;

  constructor(secretKey: Buffer, publicKey: Buffer) {
    this.#secretKey = secretKey;
    this.publicKey = publicKey;
    this.keyId = signingKeyId(publicKey);
  }

  /** The Ed25519 signature of `message`, as hex (it goes into a line). */
  sign(message: Buffer): string {
    const signature = Buffer.alloc(SIGNATURE_BYTES);
    sodium.crypto_sign_detached(signature, message, this.#secretKey);
    return signature.toString('hex');
  }

  /** Zeroes the secret key (the worker's zeroize). */
  zero(): void {
    sodium.sodium_memzero(this.#secretKey);
  }
}

/** Expands a seed (in locked memory) into a signer; zeroes the seed. */
export function signerFromSeed(seed: Buffer): AuditSigner {
  const secretKey = sodium.sodium_malloc(sodium.crypto_sign_SECRETKEYBYTES);
  const publicKey = Buffer.alloc(SIGNING_PUBLIC_KEY_BYTES);
  try {
    sodium.crypto_sign_seed_keypair(publicKey, secretKey, seed);
  } finally {
    sodium.sodium_memzero(seed);
  }
  return new AuditSigner(secretKey, publicKey);
}

/** Reads the private key file keygen --audit-signing-key made (label, then the seed as hex). */
export function loadAuditSigner(ref: AuditSigningKeyRef): AuditSigner {
  const what = `audit signing key file ${ref.path}`;
  const raw = readKeyFile(ref.path, what, ref.allowOpen, CODES);
  const seed = sodium.sodium_malloc(SIGNING_SEED_BYTES);
  try {
    if (raw.length < LABEL.length || !raw.subarray(0, LABEL.length).equals(LABEL)) {
      throw new WorkerFault(
        'AUDIT_SIGNING_KEY_INVALID',
        `${what} does not start with "${SIGNING_KEY_FILE_LABEL}" (make one with keygen --audit-signing-key)`,
      );
    }
    try {
      decodeHexKey(raw.subarray(LABEL.length), what, seed);
    } catch {
      throw new WorkerFault(
        'AUDIT_SIGNING_KEY_INVALID',
        `${what} must hold the label and then exactly 64 hex characters`,
      );
    }
  } catch (err) {
    sodium.sodium_memzero(seed);
    throw err;
  } finally {
    sodium.sodium_memzero(raw);
  }
  return signerFromSeed(seed);
}
