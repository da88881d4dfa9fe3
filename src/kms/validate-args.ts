/**
 * Argument checks of the Kms interface and the size limits behind them, shared by the embedded
 * KMS and the remote client, so that the same bad argument gets the same error (INVALID_INPUT or
 * PAYLOAD_TOO_LARGE) in both modes: the remote client checks before anything is sent. Pure
 * functions: no key material, no registry, no workers.
 */
import { kmsError } from '../errors.js';
import { MAX_CIPHERTEXT_OVERHEAD } from '../format.js';

/** Largest plaintext one operation takes. */
export const MAX_PLAINTEXT_BYTES = 64 * 1024 * 1024;
/** Largest ciphertext one operation takes: that of the largest plaintext. */
export const MAX_CIPHERTEXT_BYTES = MAX_PLAINTEXT_BYTES + MAX_CIPHERTEXT_OVERHEAD;
export const MAX_AAD_BYTES = 64 * 1024;
/** Longest key or thread id, in UTF-16 code units. */
export const MAX_ID_LENGTH = 256;

/**
 * C0 controls and DEL. No id the KMS or the server makes holds one (key ids are `dek_<hex>`,
 * server thread ids are ULIDs); refusing them keeps log and audit lines one line per entry.
 */
export function hasControlChar(value: string): boolean {
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c < 0x20 || c === 0x7f) return true;
  }
  return false;
}

/**
 * Whether a key or thread id may reach the registry. Checked before any lookup: an id longer than
 * LMDB's key limit (~2 KB) would otherwise fail inside LMDB as INTERNAL.
 */
export function isValidId(value: unknown): value is string {
  return (
    typeof value === 'string' && value.length > 0 && value.length <= MAX_ID_LENGTH && !hasControlChar(value)
  );
}

export function checkId(name: string, value: unknown): string {
  if (!isValidId(value)) {
    throw kmsError(
      'INVALID_INPUT',
      `${name} must be a non-empty string of at most ${MAX_ID_LENGTH} characters, without control characters`,
    );
  }
  return value;
}

export function checkBytes(name: string, value: unknown, max: number): Uint8Array {
  if (!(value instanceof Uint8Array))
    throw kmsError('INVALID_INPUT', `${name} must be a Uint8Array or Buffer`);
  if (value.length > max) throw kmsError('PAYLOAD_TOO_LARGE', `${name} is larger than ${max} bytes`);
  return value;
}

export function checkAad(value: unknown): Uint8Array | null {
  return value === undefined || value === null ? null : checkBytes('aad', value, MAX_AAD_BYTES);
}

/**
 * The arguments of one encrypt (plaintext), or decrypt or reencrypt (ciphertext), in the order
 * the embedded KMS checks them: key id, data, AAD.
 */
export function checkDataArgs(encrypt: boolean, keyId: unknown, data: unknown, aad: unknown): void {
  checkId('key_id', keyId);
  if (encrypt) checkBytes('plaintext', data, MAX_PLAINTEXT_BYTES);
  else checkBytes('ciphertext', data, MAX_CIPHERTEXT_BYTES);
  checkAad(aad);
}
