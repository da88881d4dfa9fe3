/**
 * Sealing and opening of ciphertexts and wrapped keys in both formats (layouts in src/format.ts):
 * XChaCha20-Poly1305 through libsodium (the default), AES-256-GCM through node:crypto (for
 * deployments bound to FIPS-approved algorithms, and to read data written before format 2).
 * Worker-only: these functions take raw keys.
 *
 * libsodium reads the key straight from its locked slot (KeyArena) and wipes its own state;
 * node:crypto copies an AES key into an OpenSSL context for each operation, which OpenSSL
 * cleanses when the context is freed, but that copy is not in locked memory.
 */
import { createCipheriv, createDecipheriv } from 'node:crypto';
import sodium from 'sodium-native';
import {
  CIPHERTEXT_HEADER_BYTES,
  ciphertextFormat,
  ciphertextLead,
  ciphertextOverhead,
  FORMAT_AES_256_GCM,
  FORMAT_XCHACHA20_POLY1305,
  KEY_BYTES,
  nonceBytes,
  type SealFormat,
  TAG_BYTES,
  WRAP_HEADER_BYTES,
  wrappedKeyBytes,
} from '../src/format.js';

const AES = 'aes-256-gcm';

/**
 * Nonces come from a large random buffer refilled in one call: a fresh random draw per message
 * costs about a third of a 1 KiB encrypt. Each nonce is still fresh CSPRNG output, used once.
 */
const NONCE_POOL = Buffer.alloc(24 * 4096);
let noncePos = NONCE_POOL.length;

/**
 * Writes `length` fresh random nonce bytes into `out` at `offset`, zeroing them in the pool as it
 * goes. A byte loop: for 12 or 24 bytes it costs less than making a view to copy from.
 */
function fillNonce(out: Uint8Array, offset: number, length: number): void {
  if (noncePos + length > NONCE_POOL.length) {
    sodium.randombytes_buf(NONCE_POOL);
    noncePos = 0;
  }
  for (let i = 0; i < length; i++) {
    out[offset + i] = NONCE_POOL[noncePos + i] as number;
    NONCE_POOL[noncePos + i] = 0;
  }
  noncePos += length;
}

/** Thrown for any authentication failure: tampered data, wrong key, wrong AAD. */
export class AuthFailure extends Error {}

/** libsodium takes one AAD buffer: header ‖ caller AAD is assembled here (AAD is not secret). */
let adScratch = Buffer.allocUnsafeSlow(4096);

function joinAad(header: Uint8Array, extra: Uint8Array | null, extraText: string | null): Buffer {
  const extraBytes = extra?.length ?? (extraText === null ? 0 : Buffer.byteLength(extraText));
  const length = header.length + extraBytes;
  if (adScratch.length < length) adScratch = Buffer.allocUnsafeSlow(Math.max(length, adScratch.length * 2));
  adScratch.set(header, 0);
  if (extra !== null) adScratch.set(extra, header.length);
  else if (extraText !== null) adScratch.write(extraText, header.length, 'utf8');
  return adScratch.subarray(0, length);
}

/**
 * The format-2 data path seals and opens a ciphertext where it lies in the task buffer, with its
 * nonce and (without caller AAD) its header-only AD in these scratch buffers: a per-op view costs
 * ~45 ns, and the path used to make seven per op (about a tenth of a worker's time on one key).
 */
const XCHACHA_LEAD = ciphertextLead(FORMAT_XCHACHA20_POLY1305);
const NONCE_SCRATCH = Buffer.alloc(nonceBytes(FORMAT_XCHACHA20_POLY1305));
const HEADER_AD = Buffer.alloc(CIPHERTEXT_HEADER_BYTES);

/** The AD of the format-2 ciphertext whose header is at `data[at]`: its header ‖ the caller's AAD. */
function headerAd(data: Buffer, at: number, aad: Uint8Array | null): Uint8Array {
  if (aad !== null && aad.length > 0)
    return joinAad(data.subarray(at, at + CIPHERTEXT_HEADER_BYTES), aad, null);
  for (let i = 0; i < CIPHERTEXT_HEADER_BYTES; i++) HEADER_AD[i] = data[at + i] as number;
  return HEADER_AD;
}

/** The op slots of a task (src/worker-abi/batch-task.ts): where op `i`'s input lies. */
interface OpInputs {
  inputOffset(i: number): number;
  inputLength(i: number): number;
  input(i: number): Buffer;
}

/**
 * Op `i`'s encrypt into its slot at `data[outPos]`: in format 2 where its plaintext lies (the
 * pool lays it out at the format-2 lead), else through sealInto(). Returns the ciphertext's length.
 */
export function sealOp(
  format: SealFormat,
  key: Uint8Array,
  keyVersion: number,
  data: Buffer,
  outPos: number,
  ops: OpInputs,
  i: number,
  aad: Uint8Array | null,
): number {
  if (format === FORMAT_XCHACHA20_POLY1305 && ops.inputOffset(i) === outPos + XCHACHA_LEAD) {
    return sealInSlot(key, keyVersion, data, outPos, ops.inputLength(i), aad);
  }
  return sealInto(format, key, keyVersion, ops.input(i), aad, data, outPos);
}

/** Op `i`'s decrypt: where it lies in format 2, else into its slot at `data[outPos]`; its length. */
export function openOp(
  key: Uint8Array,
  data: Buffer,
  outPos: number,
  ops: OpInputs,
  i: number,
  aad: Uint8Array | null,
): number {
  const at = ops.inputOffset(i);
  const length = ops.inputLength(i);
  if (isSlotOpenable(data, at, length)) return openInSlot(key, data, at, length, aad);
  return openInto(key, ops.input(i), aad, data, outPos);
}

/** Where openOp() left op `i`'s plaintext. */
export function openedPlaintextAt(data: Buffer, outPos: number, ops: OpInputs, i: number): number {
  const at = ops.inputOffset(i);
  return isSlotOpenable(data, at, ops.inputLength(i)) ? at + XCHACHA_LEAD : outPos;
}

/**
 * Encrypts, in format 2, the `length` plaintext bytes that sit at `data[at + XCHACHA_LEAD]`,
 * where they lie, writing header and nonce before them: the ciphertext is the `length +
 * ciphertextOverhead(2)` bytes from `at`, and its length is returned.
 */
function sealInSlot(
  key: Uint8Array,
  keyVersion: number,
  data: Buffer,
  at: number,
  length: number,
  aad: Uint8Array | null,
): number {
  const body = at + XCHACHA_LEAD;
  data[at] = FORMAT_XCHACHA20_POLY1305;
  data.writeUInt32BE(keyVersion, at + 1);
  fillNonce(NONCE_SCRATCH, 0, NONCE_SCRATCH.length);
  for (let i = 0; i < NONCE_SCRATCH.length; i++)
    data[at + CIPHERTEXT_HEADER_BYTES + i] = NONCE_SCRATCH[i] as number;
  const m = data.subarray(body, body + length);
  const c = data.subarray(body, body + length + TAG_BYTES);
  xchachaSeal(key, NONCE_SCRATCH, headerAd(data, at, aad), m, c);
  return XCHACHA_LEAD + length + TAG_BYTES;
}

/**
 * Whether the `length` bytes at `data[at]` can be a format-2 ciphertext, to open with
 * openInSlot(); anything else goes through openInto(), which fails what is not a ciphertext.
 */
function isSlotOpenable(data: Buffer, at: number, length: number): boolean {
  return length >= ciphertextOverhead(FORMAT_XCHACHA20_POLY1305) && data[at] === FORMAT_XCHACHA20_POLY1305;
}

/**
 * Opens the format-2 ciphertext of `length` bytes at `data[at]` where it lies (checked with
 * isSlotOpenable()): its plaintext is left at `data[at + XCHACHA_LEAD]`, and its length is
 * returned. Nothing is written unless the tag verifies.
 */
function openInSlot(
  key: Uint8Array,
  data: Buffer,
  at: number,
  length: number,
  aad: Uint8Array | null,
): number {
  const body = at + XCHACHA_LEAD;
  const plainLength = length - XCHACHA_LEAD - TAG_BYTES;
  for (let i = 0; i < NONCE_SCRATCH.length; i++)
    NONCE_SCRATCH[i] = data[at + CIPHERTEXT_HEADER_BYTES + i] as number;
  const c = data.subarray(body, at + length);
  const m = data.subarray(body, body + plainLength);
  xchachaOpen(key, NONCE_SCRATCH, headerAd(data, at, aad), c, m);
  return plainLength;
}

/** XChaCha20-Poly1305 of `m` into `c` (m.length + 16 bytes). `c` and `m` may start at the same byte. */
export function xchachaSeal(
  key: Uint8Array,
  nonce: Uint8Array,
  ad: Uint8Array,
  m: Uint8Array,
  c: Uint8Array,
): void {
  sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(c, m, ad, null, nonce, key);
}

/** Opens `c` into `m` (c.length - 16 bytes); nothing is written unless the tag verifies. */
export function xchachaOpen(
  key: Uint8Array,
  nonce: Uint8Array,
  ad: Uint8Array,
  c: Uint8Array,
  m: Uint8Array,
): void {
  try {
    sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(m, null, c, ad, nonce, key);
  } catch {
    throw new AuthFailure();
  }
}

/** Whether two views share bytes of one buffer without starting at the same byte. */
function overlapsShifted(a: Uint8Array, b: Uint8Array): boolean {
  if (a.buffer !== b.buffer || a.byteOffset === b.byteOffset) return false;
  return a.byteOffset < b.byteOffset + b.byteLength && b.byteOffset < a.byteOffset + a.byteLength;
}

/**
 * Encrypts `plaintext` into `out` at `offset` in `format`; returns the ciphertext's length
 * (plaintext.length + ciphertextOverhead(format)). An encrypt's plaintext already sits in `out` at
 * the format-2 lead, so format 2 encrypts it where it lies.
 */
export function sealInto(
  format: SealFormat,
  key: Uint8Array,
  keyVersion: number,
  plaintext: Uint8Array,
  aad: Uint8Array | null,
  out: Buffer,
  offset: number,
): number {
  const lead = ciphertextLead(format);
  const body = offset + lead;
  const end = body + plaintext.length + TAG_BYTES;
  out[offset] = format;
  out.writeUInt32BE(keyVersion, offset + 1);
  fillNonce(out, offset + CIPHERTEXT_HEADER_BYTES, lead - CIPHERTEXT_HEADER_BYTES);
  const header = out.subarray(offset, offset + CIPHERTEXT_HEADER_BYTES);
  const nonce = out.subarray(offset + CIPHERTEXT_HEADER_BYTES, body);
  if (format === FORMAT_XCHACHA20_POLY1305) {
    const c = out.subarray(body, end);
    // libsodium encrypts in place, but a plaintext shifted against its output would be overwritten
    // before it is read.
    const copy = overlapsShifted(plaintext, c) ? Buffer.from(plaintext) : null;
    xchachaSeal(key, nonce, joinAad(header, aad, null), copy ?? plaintext, c);
    copy?.fill(0);
  } else {
    // node:crypto returns the encrypted bytes in a buffer of its own, so any overlap is harmless.
    const cipher = createCipheriv(AES, key, nonce, { authTagLength: TAG_BYTES });
    cipher.setAAD(header);
    if (aad !== null && aad.length > 0) cipher.setAAD(aad);
    out.set(cipher.update(plaintext), body);
    cipher.final();
    out.set(cipher.getAuthTag(), body + plaintext.length);
  }
  return end - offset;
}

/** Decrypts a ciphertext of either format into `out` at `offset`; returns the plaintext's length. */
export function openInto(
  key: Uint8Array,
  ciphertext: Buffer,
  aad: Uint8Array | null,
  out: Buffer,
  offset: number,
): number {
  const format = ciphertextFormat(ciphertext);
  if (format === 0) throw new AuthFailure();
  const lead = ciphertextLead(format);
  const length = ciphertext.length - lead - TAG_BYTES;
  const header = ciphertext.subarray(0, CIPHERTEXT_HEADER_BYTES);
  const nonce = ciphertext.subarray(CIPHERTEXT_HEADER_BYTES, lead);
  if (format === FORMAT_XCHACHA20_POLY1305) {
    const c = ciphertext.subarray(lead);
    const m = out.subarray(offset, offset + length);
    if (!overlapsShifted(c, m)) {
      xchachaOpen(key, nonce, joinAad(header, aad, null), c, m);
      return length;
    }
    // A decrypt writes its plaintext over its own ciphertext, from the slot's start: open it in
    // place (which libsodium supports), then move it down.
    const from = c.byteOffset - out.byteOffset;
    xchachaOpen(key, nonce, joinAad(header, aad, null), c, c.subarray(0, length));
    out.copyWithin(offset, from, from + length);
    // The move leaves a copy of the plaintext's end behind it: the slot holds only the result.
    out.fill(0, offset + length, from + length);
    return length;
  }
  const decipher = createDecipheriv(AES, key, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(header);
  if (aad !== null && aad.length > 0) decipher.setAAD(aad);
  decipher.setAuthTag(ciphertext.subarray(ciphertext.length - TAG_BYTES));
  const plaintext = decipher.update(ciphertext.subarray(lead, ciphertext.length - TAG_BYTES));
  try {
    decipher.final();
  } catch {
    plaintext.fill(0);
    throw new AuthFailure();
  }
  out.set(plaintext, offset);
  plaintext.fill(0);
  return length;
}

/**
 * Wraps a 32-byte key under `wrappingKey` in `format`, binding the header and the key's identity as
 * AAD; returns the wrapped length (wrappedKeyBytes(format)).
 */
export function wrapKeyInto(
  format: SealFormat,
  wrappingKey: Uint8Array,
  kind: number,
  wrappingVersion: number,
  identity: string,
  key: Uint8Array,
  out: Buffer,
  offset: number,
): number {
  const body = offset + WRAP_HEADER_BYTES + nonceBytes(format);
  out[offset] = format;
  out[offset + 1] = kind;
  out.writeUInt32BE(wrappingVersion, offset + 2);
  fillNonce(out, offset + WRAP_HEADER_BYTES, nonceBytes(format));
  const header = out.subarray(offset, offset + WRAP_HEADER_BYTES);
  const nonce = out.subarray(offset + WRAP_HEADER_BYTES, body);
  if (format === FORMAT_XCHACHA20_POLY1305) {
    xchachaSeal(
      wrappingKey,
      nonce,
      joinAad(header, null, identity),
      key,
      out.subarray(body, body + KEY_BYTES + TAG_BYTES),
    );
  } else {
    const cipher = createCipheriv(AES, wrappingKey, nonce, { authTagLength: TAG_BYTES });
    cipher.setAAD(header);
    cipher.setAAD(Buffer.from(identity, 'utf8'));
    const encrypted = cipher.update(key);
    out.set(encrypted, body);
    encrypted.fill(0);
    cipher.final();
    out.set(cipher.getAuthTag(), body + KEY_BYTES);
  }
  return wrappedKeyBytes(format);
}

/** Unwraps a wrapped key of either format into `into` (a 32-byte slot); zeroes it on failure. */
export function unwrapKeyInto(
  wrappingKey: Uint8Array,
  kind: number,
  wrappingVersion: number,
  identity: string,
  wrapped: Uint8Array,
  into: Buffer,
): void {
  const blob = Buffer.from(wrapped.buffer, wrapped.byteOffset, wrapped.byteLength);
  const format = blob[0] as number;
  if (
    (format !== FORMAT_AES_256_GCM && format !== FORMAT_XCHACHA20_POLY1305) ||
    blob.length !== wrappedKeyBytes(format) ||
    blob[1] !== kind ||
    blob.readUInt32BE(2) !== wrappingVersion
  ) {
    throw new AuthFailure();
  }
  const body = WRAP_HEADER_BYTES + nonceBytes(format);
  const header = blob.subarray(0, WRAP_HEADER_BYTES);
  const nonce = blob.subarray(WRAP_HEADER_BYTES, body);
  if (format === FORMAT_XCHACHA20_POLY1305) {
    xchachaOpen(wrappingKey, nonce, joinAad(header, null, identity), blob.subarray(body), into);
    return;
  }
  const decipher = createDecipheriv(AES, wrappingKey, nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(header);
  decipher.setAAD(Buffer.from(identity, 'utf8'));
  decipher.setAuthTag(blob.subarray(body + KEY_BYTES));
  const opened = decipher.update(blob.subarray(body, body + KEY_BYTES));
  try {
    decipher.final();
  } catch {
    opened.fill(0);
    throw new AuthFailure();
  }
  into.set(opened);
  opened.fill(0);
}

/** Fills a slot with a fresh random key. */
export function randomKeyInto(slot: Uint8Array): void {
  sodium.randombytes_buf(slot);
}
