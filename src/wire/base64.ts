/**
 * Strict standard base64 (RFC 4648 §4, padded). Buffer.from(s, 'base64') silently skips junk,
 * accepts the URL alphabet and missing padding, so a tampered or truncated field would decode to
 * different bytes instead of failing: we check the shape first.
 */
import { kmsError } from '../errors.js';

// Whole quads, then an optional padded tail whose unused low bits are zero (canonical form).
const STRICT_BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$/;

export function isStrictBase64(value: string): boolean {
  return value.length % 4 === 0 && STRICT_BASE64.test(value);
}

/**
 * Decodes a field or throws MALFORMED_BASE64 naming it. Accepts exactly what isStrictBase64
 * accepts, checked the fast way on the hot path: canonical base64 is the only text that survives
 * decode → encode unchanged (about 5x cheaper than the regex for a 1 KiB field).
 */
export function decodeBase64Field(value: string, field: string): Buffer {
  const bytes = value.length % 4 === 0 ? Buffer.from(value, 'base64') : null;
  if (bytes === null || bytes.toString('base64') !== value) {
    throw kmsError('MALFORMED_BASE64', `field "${field}" is not valid standard base64`, { field });
  }
  return bytes;
}

export function encodeBase64(bytes: Uint8Array): string {
  return (
    Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  ).toString('base64');
}
