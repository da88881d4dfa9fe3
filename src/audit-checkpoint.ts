/**
 * Signed audit checkpoints: what lets an auditor check the log with a public key alone (see README
 * "Audit log"). Shared by the workers, which sign, and the public verifier, which needs no worker.
 *
 * The MAC chain of a stream (workers/audit-stream.ts) can only be checked with the secret audit
 * key. So each stream with a signing key also keeps a plain hash chain over its blocks, exactly as
 * written: `hash_k = SHA-256(hash_{k-1} ‖ block k's bytes)`, from 32 zero bytes. Every so often a
 * worker appends a checkpoint, a one-line block of its own:
 *   `"op":"checkpoint","covers":<n of the line before it>,"hash":"<hex>","signing_key":"<id>","sig":"<hex>"`
 * where `sig` is Ed25519 over checkpointMessage(). A checkpoint covers every line of its stream
 * before it; it is itself hashed into the chain, so the next one covers it too.
 */
import { createHash } from 'node:crypto';

export const HASH_BYTES = 32;
export const SIGNATURE_BYTES = 64;
export const SIGNING_PUBLIC_KEY_BYTES = 32;
export const SIGNING_SEED_BYTES = 32;

/**
 * The private key file: this label, then the Ed25519 seed as 64 hex characters. The label keeps a
 * master key file (64 bare hex characters) from being taken for a signing key, and the reverse.
 */
export const SIGNING_KEY_FILE_LABEL = 'progressdb-kms-audit-signing-key-ed25519:';

/** A stream's last checkpoint as the registry keeps it: the `n` it covers up to and its hash. */
export interface StreamCheckpoint {
  s: string;
  n: number;
  hash: string;
}

/** The bytes a checkpoint signs: a fixed label, the stream, the last line covered and the hash. */
export function checkpointMessage(s: string, covers: number, hashHex: string): Buffer {
  return Buffer.from(`progressdb-kms/audit-checkpoint/v1\n${s}\n${covers}\n${hashHex}`, 'latin1');
}

/** How a checkpoint names its key: the first 16 bytes of SHA-256 of the raw public key, in hex. */
export function signingKeyId(publicKey: Uint8Array): string {
  return createHash('sha256').update(publicKey).digest('hex').slice(0, 32);
}

/** The DER prefix of an Ed25519 SubjectPublicKeyInfo: followed by the 32 raw key bytes. */
const ED25519_SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

/** The public key file `keygen --audit-signing-key` writes: PEM, readable by openssl and others. */
export function publicKeyPem(publicKey: Uint8Array): string {
  const der = Buffer.concat([ED25519_SPKI_PREFIX, publicKey]).toString('base64');
  return `-----BEGIN PUBLIC KEY-----\n${der}\n-----END PUBLIC KEY-----\n`;
}

/** The raw 32 bytes of an Ed25519 public key given as PEM (SPKI) or 64 hex characters; null if neither. */
export function parsePublicKey(text: string): Buffer | null {
  const trimmed = text.trim();
  if (/^[0-9a-fA-F]{64}$/.test(trimmed)) return Buffer.from(trimmed, 'hex');
  const pem = /^-----BEGIN PUBLIC KEY-----\s+([A-Za-z0-9+/=\s]+?)\s*-----END PUBLIC KEY-----$/.exec(trimmed);
  if (pem === null) return null;
  const der = Buffer.from((pem[1] as string).replace(/\s+/g, ''), 'base64');
  const prefix = der.subarray(0, ED25519_SPKI_PREFIX.length);
  if (der.length !== ED25519_SPKI_PREFIX.length + SIGNING_PUBLIC_KEY_BYTES) return null;
  if (!prefix.equals(ED25519_SPKI_PREFIX)) return null;
  return der.subarray(ED25519_SPKI_PREFIX.length);
}

/** The raw public key as the KeyObject-free DER node:crypto's verify() takes. */
export function publicKeyDer(publicKey: Uint8Array): Buffer {
  return Buffer.concat([ED25519_SPKI_PREFIX, publicKey]);
}
