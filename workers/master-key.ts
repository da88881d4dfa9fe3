/**
 * Resolves the master key from its reference and derives the two keys the worker uses:
 * the KEK-wrapping key and the audit-signing key (HKDF-SHA256, distinct labels). The master key
 * bytes are zeroed as soon as both are derived. The file's bytes, the decoded master key and the
 * derived keys all live in locked memory (sodium_malloc, KeyArena); node's HKDF returns its output
 * in an ordinary buffer, which is copied into a slot and zeroed at once.
 *
 * The key file is read into locked memory and its hex decoded byte by byte, never through a JS string
 * (a string cannot be zeroed and may be copied by the engine); the raw file bytes are zeroed right
 * after decoding. An environment variable is a string by nature (process.env), so that source
 * leaves the hex in this worker's heap; it is decoded in place, without a further copy. From a
 * config file the worker reads only the bytes the config layer located (`master_key`'s value as
 * written), as bytes too; the main thread parsed that file once at start, which is why the key
 * file is the source to use in production.
 */
import { hkdfSync } from 'node:crypto';
import fs from 'node:fs';
import sodium from 'sodium-native';
import { describeMasterKeyRef, type ErrorCode, type MasterKeyRef } from '../src/worker-abi/index.js';
import { WorkerFault } from './fault.js';
import { KeyArena } from './key-arena.js';

export interface RootKeys {
  kekWrapKey: Buffer;
  auditKey: Buffer;
}

export const MASTER_KEY_BYTES = 32;
/** A key file is 64 hex characters and perhaps a newline; anything much larger is not a key file. */
const MAX_KEY_FILE_BYTES = 4096;

function invalidKey(what: string): WorkerFault {
  return new WorkerFault('MASTER_KEY_INVALID', `${what} must hold exactly 64 hex characters (32 bytes)`);
}

function isSpace(c: number): boolean {
  return c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d;
}

function hexValue(c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  if (c >= 0x41 && c <= 0x46) return c - 0x41 + 10;
  return -1;
}

/**
 * Decodes 64 hex characters (either case, surrounded by optional whitespace) into `into` (a new
 * 32-byte Buffer unless given). Reads the source character by character, so no string or
 * intermediate copy is made. Throws MASTER_KEY_INVALID (naming `what`, never the value) on
 * anything else, with `into` zeroed.
 */
export function decodeHexKey(
  source: Uint8Array | string,
  what: string,
  into: Buffer = Buffer.alloc(MASTER_KEY_BYTES),
): Buffer {
  const at =
    typeof source === 'string' ? (i: number) => source.charCodeAt(i) : (i: number) => source[i] as number;
  let start = 0;
  let end = source.length;
  while (start < end && isSpace(at(start))) start++;
  while (end > start && isSpace(at(end - 1))) end--;
  if (end - start !== MASTER_KEY_BYTES * 2) throw invalidKey(what);
  const key = into;
  for (let i = 0; i < MASTER_KEY_BYTES; i++) {
    const hi = hexValue(at(start + 2 * i));
    const lo = hexValue(at(start + 2 * i + 1));
    if (hi < 0 || lo < 0) {
      key.fill(0);
      throw invalidKey(what);
    }
    key[i] = (hi << 4) | lo;
  }
  return key;
}

/** Decodes a key file's raw bytes and zeroes them, whether or not they held a valid key. */
export function masterKeyFromBytes(raw: Buffer, what: string, into?: Buffer): Buffer {
  try {
    return decodeHexKey(raw, what, into);
  } finally {
    sodium.sodium_memzero(raw);
  }
}

/** The codes a key file's problems are reported with (the master key's by default). */
export interface KeyFileCodes {
  missing: ErrorCode;
  invalid: ErrorCode;
  open: ErrorCode;
}

const MASTER_KEY_CODES: KeyFileCodes = {
  missing: 'MASTER_KEY_MISSING',
  invalid: 'MASTER_KEY_INVALID',
  open: 'MASTER_KEY_FILE_OPEN',
};

/**
 * Reads a whole small file through one descriptor into locked memory. The permission check runs on
 * that descriptor (fstat), so the file checked is the file read. Unless `allowOpen`, a file that
 * group or others may read or write is refused, as ssh refuses such a private key.
 */
export function readKeyFile(
  file: string,
  what: string,
  allowOpen: boolean,
  codes: KeyFileCodes = MASTER_KEY_CODES,
): Buffer {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new WorkerFault(codes.missing, `cannot read ${what} (${code ?? 'error'})`);
  }
  try {
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) throw new WorkerFault(codes.invalid, `${what} is not a regular file`);
    if (!allowOpen && (stat.mode & 0o077) !== 0) {
      throw new WorkerFault(
        codes.open,
        `${what} is accessible by group or others (mode ${(stat.mode & 0o777).toString(8)}): ` +
          'chmod 600 it, or pass --allow-open-key-file',
      );
    }
    // One byte more than allowed shows a file that is too large without reading all of it.
    // Locked memory; zeroed once decoded, and released by sodium-native when collected.
    const raw = sodium.sodium_malloc(MAX_KEY_FILE_BYTES + 1);
    let length = 0;
    try {
      while (length < raw.length) {
        const n = fs.readSync(fd, raw, length, raw.length - length, null);
        if (n === 0) break;
        length += n;
      }
    } catch (err) {
      sodium.sodium_memzero(raw);
      const code = (err as NodeJS.ErrnoException).code;
      throw new WorkerFault(codes.missing, `cannot read ${what} (${code ?? 'error'})`);
    }
    if (length > MAX_KEY_FILE_BYTES) {
      sodium.sodium_memzero(raw);
      throw codes === MASTER_KEY_CODES
        ? invalidKey(what)
        : new WorkerFault(codes.invalid, `${what} is too large to be a key file`);
    }
    // subarray shares raw's memory, so zeroing through it (masterKeyFromBytes) zeroes raw's key bytes.
    return raw.subarray(0, length);
  } finally {
    fs.closeSync(fd);
  }
}

/** The master key, decoded into the slot `into`. */
function readMasterKey(ref: MasterKeyRef, into: Buffer): Buffer {
  const what = describeMasterKeyRef(ref);
  switch (ref.kind) {
    case 'file':
      return masterKeyFromBytes(readKeyFile(ref.path, what, ref.allowOpen === true), what, into);
    case 'env': {
      const value = process.env[ref.name];
      if (value === undefined || value === '')
        throw new WorkerFault('MASTER_KEY_MISSING', `${what} is not set`);
      return decodeHexKey(value, what, into);
    }
    case 'config':
      return masterKeyFromBytes(readConfigValue(ref, what), what, into);
  }
}

/** The located value's bytes, without the quotes it may be written in. */
function readConfigValue(ref: Extract<MasterKeyRef, { kind: 'config' }>, what: string): Buffer {
  if (ref.length > MAX_KEY_FILE_BYTES) throw invalidKey(what);
  const raw = sodium.sodium_malloc(ref.length);
  let fd: number;
  try {
    fd = fs.openSync(ref.path, 'r');
  } catch (err) {
    throw new WorkerFault(
      'MASTER_KEY_MISSING',
      `cannot read ${what} (${(err as NodeJS.ErrnoException).code ?? 'error'})`,
    );
  }
  let length = 0;
  try {
    while (length < raw.length) {
      const n = fs.readSync(fd, raw, length, raw.length - length, ref.offset + length);
      if (n === 0) break;
      length += n;
    }
  } catch (err) {
    sodium.sodium_memzero(raw);
    throw new WorkerFault(
      'MASTER_KEY_MISSING',
      `cannot read ${what} (${(err as NodeJS.ErrnoException).code ?? 'error'})`,
    );
  } finally {
    fs.closeSync(fd);
  }
  const first = raw[0];
  const quoted = length >= 2 && (first === 0x22 || first === 0x27) && raw[length - 1] === first;
  // subarray shares raw's memory, so zeroing the result zeroes every byte read.
  return quoted ? raw.subarray(1, length - 1) : raw.subarray(0, length);
}

/** The root keys, in slots of `arena` (a small one of their own unless given). */
export function loadRootKeys(ref: MasterKeyRef, arena: KeyArena = new KeyArena(3)): RootKeys {
  const master = arena.alloc();
  try {
    readMasterKey(ref, master);
    const derive = (label: string) => {
      const derived = new Uint8Array(
        hkdfSync('sha256', master, Buffer.alloc(0), `progressdb/${label}/v1`, 32),
      );
      const slot = arena.copyOf(derived);
      derived.fill(0);
      return slot;
    };
    return { kekWrapKey: derive('kek-wrap'), auditKey: derive('audit') };
  } finally {
    arena.free(master);
  }
}
