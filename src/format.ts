/**
 * Byte layouts of ciphertexts and wrapped keys. Pure layout: no key material, so both the workers
 * (which seal and open) and the main thread (which only reads the DEK version of a ciphertext to
 * pick the wrapped key to send) use it.
 *
 * Two formats, told apart by their first byte; both stay readable, new data is written in the
 * configured cipher (`cipher`, default XChaCha20-Poly1305):
 *   format 1: AES-256-GCM, 12-byte random nonce (node:crypto)
 *   format 2: XChaCha20-Poly1305 (IETF), 24-byte random nonce (libsodium). Random 192-bit nonces
 *             have no practical collision bound, where GCM's 96-bit ones limit a key to about 2^32
 *             messages.
 *
 * Ciphertext under a DEK version:
 *   [0]        format
 *   [1..4]     DEK version, uint32 BE
 *   [5..5+N]   nonce (N = 12 or 24)
 *   [..n-16]   ciphertext
 *   [n-16..]   tag
 * AAD = bytes 0..4 ‖ caller AAD, so the version cannot be altered without failing.
 *
 * Wrapped key (a DEK under a KEK version, or a KEK version under the master key):
 *   [0] format, [1] kind (1 = DEK, 2 = KEK), [2..5] wrapping KEK version (0 = master),
 *   [6..6+N] nonce, then the 32 wrapped key bytes and the 16-byte tag
 * AAD = bytes 0..5 ‖ the key's identity (kind, id, version), so two wrapped records cannot be
 * swapped unnoticed.
 */
export const FORMAT_AES_256_GCM = 0x01;
export const FORMAT_XCHACHA20_POLY1305 = 0x02;
export type SealFormat = typeof FORMAT_AES_256_GCM | typeof FORMAT_XCHACHA20_POLY1305;

/** The `cipher` setting's values, and the format each writes. */
export const CIPHERS = {
  'xchacha20-poly1305': FORMAT_XCHACHA20_POLY1305,
  'aes-256-gcm': FORMAT_AES_256_GCM,
} as const satisfies Record<string, SealFormat>;
export type CipherName = keyof typeof CIPHERS;
export const DEFAULT_CIPHER: CipherName = 'xchacha20-poly1305';

export const CIPHERTEXT_HEADER_BYTES = 5;
export const TAG_BYTES = 16;
export const KEY_BYTES = 32;
export const WRAP_HEADER_BYTES = 6;
export const WRAP_KIND_DEK = 1;
export const WRAP_KIND_KEK = 2;
/** An earlier master key's audit key, kept after a master re-key (WrappedAuditKey). */
export const WRAP_KIND_AUDIT_KEY = 3;

/** Nonce bytes of a format, or 0 when the byte names no format of ours. */
export function nonceBytes(format: number): number {
  if (format === FORMAT_XCHACHA20_POLY1305) return 24;
  if (format === FORMAT_AES_256_GCM) return 12;
  return 0;
}

/** Header and nonce: where the encrypted bytes of a ciphertext start. */
export function ciphertextLead(format: SealFormat): number {
  return CIPHERTEXT_HEADER_BYTES + nonceBytes(format);
}

/** Bytes a ciphertext adds to its plaintext in `format`. */
export function ciphertextOverhead(format: SealFormat): number {
  return ciphertextLead(format) + TAG_BYTES;
}

/** Bytes of a key wrapped in `format`. */
export function wrappedKeyBytes(format: SealFormat): number {
  return WRAP_HEADER_BYTES + nonceBytes(format) + KEY_BYTES + TAG_BYTES;
}

/** The largest of the formats' figures: buffers laid out before the format is known use these. */
export const MAX_CIPHERTEXT_LEAD = ciphertextLead(FORMAT_XCHACHA20_POLY1305);
export const MAX_CIPHERTEXT_OVERHEAD = ciphertextOverhead(FORMAT_XCHACHA20_POLY1305);
export const MIN_CIPHERTEXT_OVERHEAD = ciphertextOverhead(FORMAT_AES_256_GCM);
export const MAX_WRAPPED_KEY_BYTES = wrappedKeyBytes(FORMAT_XCHACHA20_POLY1305);

/** The format of a ciphertext, or 0 when the bytes cannot be a ciphertext of ours. */
export function ciphertextFormat(ciphertext: Uint8Array): SealFormat | 0 {
  const format = ciphertext.length > 0 ? (ciphertext[0] as number) : 0;
  if (format !== FORMAT_AES_256_GCM && format !== FORMAT_XCHACHA20_POLY1305) return 0;
  return ciphertext.length >= ciphertextOverhead(format) ? format : 0;
}

/** The DEK version a ciphertext names, or -1 when the bytes cannot be one of ours. */
export function ciphertextKeyVersion(ciphertext: Uint8Array): number {
  if (ciphertextFormat(ciphertext) === 0) return -1;
  // In bounds: ciphertextFormat checked the length covers at least the header.
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

export function auditKeyIdentity(id: string): string {
  return `audit\u0000${id}`;
}
