/**
 * Byte layouts of ciphertexts and wrapped keys. Pure layout: no key material, so both the workers
 * (which seal and open) and the main thread (which only reads the DEK version of a ciphertext to
 * pick the wrapped key to send) use it.
 *
 * Ciphertext (AES-256-GCM under a DEK version):
 *   [0]      format 0x01
 *   [1..4]   DEK version, uint32 BE
 *   [5..16]  nonce (96 random bits)
 *   [17..n-16] ciphertext
 *   [n-16..] tag
 * GCM AAD = bytes 0..4 ‖ caller AAD, so the version cannot be altered without failing.
 *
 * Wrapped key (a DEK under a KEK version, or a KEK version under the master key):
 *   [0] format 0x01, [1] kind (1 = DEK, 2 = KEK), [2..5] wrapping KEK version (0 = master),
 *   [6..17] nonce, [18..49] wrapped key, [50..65] tag
 * GCM AAD = bytes 0..5 ‖ the key's identity (kind, id, version), so two wrapped records cannot be
 * swapped unnoticed.
 */
export const CIPHERTEXT_FORMAT = 0x01;
export const CIPHERTEXT_HEADER_BYTES = 5;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const CIPHERTEXT_OVERHEAD = CIPHERTEXT_HEADER_BYTES + NONCE_BYTES + TAG_BYTES;

export const WRAP_FORMAT = 0x01;
export const WRAP_KIND_DEK = 1;
export const WRAP_KIND_KEK = 2;
export const WRAP_HEADER_BYTES = 6;
export const KEY_BYTES = 32;
export const WRAPPED_KEY_BYTES = WRAP_HEADER_BYTES + NONCE_BYTES + KEY_BYTES + TAG_BYTES;

/** The DEK version a ciphertext names, or -1 when the bytes cannot be one of ours. */
export function ciphertextKeyVersion(ciphertext: Uint8Array): number {
  if (ciphertext.length < CIPHERTEXT_OVERHEAD || ciphertext[0] !== CIPHERTEXT_FORMAT) return -1;
  // In bounds: the length check above guarantees at least CIPHERTEXT_OVERHEAD bytes.
  const b1 = ciphertext[1] as number;
  const b2 = ciphertext[2] as number;
  const b3 = ciphertext[3] as number;
  const b4 = ciphertext[4] as number;
  const v = ((b1 << 24) | (b2 << 16) | (b3 << 8) | b4) >>> 0;
  return v >= 1 && v <= 0x7fffffff ? v : -1;
}

/** Identity bound into a wrapped DEK's AAD. */
export function dekIdentity(keyId: string, keyVersion: number): string {
  return `dek\u0000${keyId}\u0000${keyVersion}`;
}

/** Identity bound into a wrapped KEK's AAD. */
export function kekIdentity(kekId: string, version: number): string {
  return `kek\u0000${kekId}\u0000${version}`;
}
