/**
 * Resolves the master key from its reference and derives the two keys the worker uses:
 * the KEK-wrapping key and the audit-signing key (HKDF-SHA256, distinct labels). The master key
 * bytes are zeroed as soon as both are derived.
 */
import { hkdfSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { describeMasterKeyRef, type MasterKeyRef } from '../src/protocol.js';

export interface RootKeys {
  kekWrapKey: Buffer;
  auditKey: Buffer;
}

/** Error messages carry a stable code in brackets; the main thread turns it back into a CodedError. */
export function coded(code: string, message: string): Error {
  return new Error(`[${code}] ${message}`);
}

const HEX_KEY = /^[0-9a-fA-F]{64}$/;

function readHex(ref: MasterKeyRef): string {
  switch (ref.kind) {
    case 'file': {
      try {
        return readFileSync(ref.path, 'utf8').trim();
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        throw coded('MASTER_KEY_MISSING', `cannot read ${describeMasterKeyRef(ref)} (${code ?? 'error'})`);
      }
    }
    case 'env': {
      const value = process.env[ref.name];
      if (value === undefined || value === '')
        throw coded('MASTER_KEY_MISSING', `${describeMasterKeyRef(ref)} is not set`);
      return value.trim();
    }
    case 'config': {
      let doc: unknown;
      try {
        doc = parseYaml(readFileSync(ref.path, 'utf8'));
      } catch {
        throw coded('MASTER_KEY_MISSING', `cannot read or parse config file ${ref.path}`);
      }
      const value = (doc as { master_key?: unknown } | null)?.master_key;
      if (typeof value !== 'string')
        throw coded('MASTER_KEY_MISSING', `${describeMasterKeyRef(ref)} is missing`);
      return value.trim();
    }
  }
}

export function loadRootKeys(ref: MasterKeyRef): RootKeys {
  const hex = readHex(ref);
  if (!HEX_KEY.test(hex)) {
    throw coded(
      'MASTER_KEY_INVALID',
      `${describeMasterKeyRef(ref)} must hold exactly 64 hex characters (32 bytes)`,
    );
  }
  const master = Buffer.from(hex, 'hex');
  try {
    const derive = (label: string) =>
      Buffer.from(hkdfSync('sha256', master, Buffer.alloc(0), `progressdb/${label}/v1`, 32));
    return { kekWrapKey: derive('kek-wrap'), auditKey: derive('audit') };
  } finally {
    master.fill(0);
  }
}
