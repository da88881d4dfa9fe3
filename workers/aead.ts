/**
 * AES-256-GCM sealing and opening for ciphertexts and wrapped keys (layouts in src/format.ts).
 * Worker-only: these functions take raw keys.
 */
import { createCipheriv, createDecipheriv, randomFillSync } from 'node:crypto';
import {
  CIPHERTEXT_FORMAT,
  CIPHERTEXT_HEADER_BYTES,
  CIPHERTEXT_OVERHEAD,
  KEY_BYTES,
  NONCE_BYTES,
  TAG_BYTES,
  WRAP_FORMAT,
  WRAP_HEADER_BYTES,
  WRAPPED_KEY_BYTES,
} from '../src/format.js';

const ALGORITHM = 'aes-256-gcm';

/**
 * Nonces come from a large random buffer refilled in one call: a randomBytes(12) per message
 * costs about a third of a 1 KiB encrypt. Each nonce is still 96 fresh CSPRNG bits, used once.
 */
const NONCE_POOL = Buffer.alloc(NONCE_BYTES * 4096);
let noncePos = NONCE_POOL.length;

/** Writes a fresh nonce into `out` at `offset`. */
export function fillNonce(out: Uint8Array, offset: number): void {
  if (noncePos === NONCE_POOL.length) {
    randomFillSync(NONCE_POOL);
    noncePos = 0;
  }
  out.set(NONCE_POOL.subarray(noncePos, noncePos + NONCE_BYTES), offset);
  NONCE_POOL.fill(0, noncePos, noncePos + NONCE_BYTES);
  noncePos += NONCE_BYTES;
}

/** Thrown for any authentication failure: tampered data, wrong key, wrong AAD. */
export class AuthFailure extends Error {}

/**
 * Encrypts `plaintext` into `out` at `offset` (exactly plaintext.length + CIPHERTEXT_OVERHEAD bytes).
 */
export function sealInto(
  key: Uint8Array,
  keyVersion: number,
  plaintext: Uint8Array,
  aad: Uint8Array | null,
  out: Buffer,
  offset: number,
): void {
  out[offset] = CIPHERTEXT_FORMAT;
  out.writeUInt32BE(keyVersion, offset + 1);
  fillNonce(out, offset + CIPHERTEXT_HEADER_BYTES);
  const nonce = out.subarray(
    offset + CIPHERTEXT_HEADER_BYTES,
    offset + CIPHERTEXT_HEADER_BYTES + NONCE_BYTES,
  );
  const cipher = createCipheriv(ALGORITHM, key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(out.subarray(offset, offset + CIPHERTEXT_HEADER_BYTES));
  if (aad !== null && aad.length > 0) cipher.setAAD(aad);
  const body = offset + CIPHERTEXT_HEADER_BYTES + NONCE_BYTES;
  const encrypted = cipher.update(plaintext);
  out.set(encrypted, body);
  cipher.final();
  out.set(cipher.getAuthTag(), body + plaintext.length);
}

/** Decrypts a ciphertext into `out` at `offset` (ciphertext.length - CIPHERTEXT_OVERHEAD bytes). */
export function openInto(
  key: Uint8Array,
  ciphertext: Buffer,
  aad: Uint8Array | null,
  out: Buffer,
  offset: number,
): void {
  if (ciphertext.length < CIPHERTEXT_OVERHEAD || ciphertext[0] !== CIPHERTEXT_FORMAT) throw new AuthFailure();
  const nonce = ciphertext.subarray(CIPHERTEXT_HEADER_BYTES, CIPHERTEXT_HEADER_BYTES + NONCE_BYTES);
  const decipher = createDecipheriv(ALGORITHM, key, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(ciphertext.subarray(0, CIPHERTEXT_HEADER_BYTES));
  if (aad !== null && aad.length > 0) decipher.setAAD(aad);
  decipher.setAuthTag(ciphertext.subarray(ciphertext.length - TAG_BYTES));
  const plaintext = decipher.update(
    ciphertext.subarray(CIPHERTEXT_HEADER_BYTES + NONCE_BYTES, ciphertext.length - TAG_BYTES),
  );
  try {
    decipher.final();
  } catch {
    plaintext.fill(0);
    throw new AuthFailure();
  }
  out.set(plaintext, offset);
  plaintext.fill(0);
}

/** Wraps a 32-byte key under `wrappingKey`, binding the header and the key's identity as AAD. */
export function wrapKeyInto(
  wrappingKey: Uint8Array,
  kind: number,
  wrappingVersion: number,
  identity: string,
  key: Uint8Array,
  out: Buffer,
  offset: number,
): void {
  out[offset] = WRAP_FORMAT;
  out[offset + 1] = kind;
  out.writeUInt32BE(wrappingVersion, offset + 2);
  fillNonce(out, offset + WRAP_HEADER_BYTES);
  const nonce = out.subarray(offset + WRAP_HEADER_BYTES, offset + WRAP_HEADER_BYTES + NONCE_BYTES);
  const cipher = createCipheriv(ALGORITHM, wrappingKey, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(out.subarray(offset, offset + WRAP_HEADER_BYTES));
  cipher.setAAD(Buffer.from(identity, 'utf8'));
  const body = offset + WRAP_HEADER_BYTES + NONCE_BYTES;
  const encrypted = cipher.update(key);
  out.set(encrypted, body);
  encrypted.fill(0);
  cipher.final();
  out.set(cipher.getAuthTag(), body + KEY_BYTES);
}

/** Unwraps a wrapped key; the caller owns (and must zero) the returned buffer. */
export function unwrapKey(
  wrappingKey: Uint8Array,
  kind: number,
  wrappingVersion: number,
  identity: string,
  wrapped: Uint8Array,
): Buffer {
  const blob = Buffer.from(wrapped.buffer, wrapped.byteOffset, wrapped.byteLength);
  if (
    blob.length !== WRAPPED_KEY_BYTES ||
    blob[0] !== WRAP_FORMAT ||
    blob[1] !== kind ||
    blob.readUInt32BE(2) !== wrappingVersion
  ) {
    throw new AuthFailure();
  }
  const nonce = blob.subarray(WRAP_HEADER_BYTES, WRAP_HEADER_BYTES + NONCE_BYTES);
  const decipher = createDecipheriv(ALGORITHM, wrappingKey, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(blob.subarray(0, WRAP_HEADER_BYTES));
  decipher.setAAD(Buffer.from(identity, 'utf8'));
  decipher.setAuthTag(blob.subarray(WRAPPED_KEY_BYTES - TAG_BYTES));
  const key = Buffer.alloc(KEY_BYTES);
  const opened = decipher.update(
    blob.subarray(WRAP_HEADER_BYTES + NONCE_BYTES, WRAPPED_KEY_BYTES - TAG_BYTES),
  );
  try {
    decipher.final();
  } catch {
    opened.fill(0);
    throw new AuthFailure();
  }
  key.set(opened);
  opened.fill(0);
  return key;
}

/** A fresh random 32-byte key in its own (unpooled) buffer, so zeroing it touches nothing else. */
export function newKey(): Buffer {
  const key = Buffer.alloc(KEY_BYTES);
  randomFillSync(key);
  return key;
}
