/**
 * Who may call the daemon, as its configuration says: bearer tokens (inline or from files), the
 * networks allowed by address, and the TLS material of its listeners; plus the small helpers
 * every daemon check uses to report a problem instead of throwing the first one.
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { z } from 'zod';
import { CodedError, kmsError } from '../errors.js';
import type { AllowedNetwork, TlsMaterial, TokenEntry } from '../kms-server/auth.js';

export const MIN_TOKEN_LENGTH = 16;
/**
 * Longest token, in bytes. Before a bridge connection is authenticated it may send only an AUTH
 * frame of PRE_AUTH_FRAME_BYTES (bridge.ts), which must hold the longest token.
 */
export const MAX_TOKEN_BYTES = 1024;
export const TokenSchema = z
  .strictObject({
    name: z.string().min(1).max(128),
    token: z.string().optional(),
    token_file: z.string().optional(),
  })
  .refine((t) => (t.token === undefined) !== (t.token_file === undefined), {
    message: 'give exactly one of token or token_file',
  });

type TokenConfig = z.infer<typeof TokenSchema>;

export function invalid(message: string): Error {
  return kmsError('CONFIG_INVALID', message);
}

/** Runs one check; a CONFIG_INVALID it throws becomes a problem and `fallback` stands in for its value. */
export function collect<T>(problems: string[], check: () => T, fallback: T): T {
  try {
    return check();
  } catch (err) {
    if (!(err instanceof CodedError) || err.code !== 'CONFIG_INVALID') throw err;
    problems.push(...((err.details?.problems as string[] | undefined) ?? [err.message]));
    return fallback;
  }
}

export function readText(file: string, what: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (err) {
    throw invalid(`cannot read ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
  }
}

export function loadTokens(
  entries: readonly TokenConfig[] | undefined,
  baseDir: string,
  problems: string[],
): TokenEntry[] {
  const tokens: TokenEntry[] = [];
  const names = new Set<string>();
  for (const entry of entries ?? []) collect(problems, () => loadToken(entry), undefined);
  return tokens;

  function loadToken(entry: TokenConfig): void {
    const token =
      entry.token ??
      // The schema requires exactly one of token and token_file.
      readText(path.resolve(baseDir, entry.token_file as string), `token file of "${entry.name}"`).trim();
    if (token.length < MIN_TOKEN_LENGTH || /\s/.test(token)) {
      throw invalid(`token "${entry.name}" must be at least ${MIN_TOKEN_LENGTH} characters without spaces`);
    }
    if (Buffer.byteLength(token) > MAX_TOKEN_BYTES) {
      throw invalid(`token "${entry.name}" must be at most ${MAX_TOKEN_BYTES} bytes`);
    }
    if (names.has(entry.name)) throw invalid(`token name "${entry.name}" is used twice`);
    names.add(entry.name);
    tokens.push({ name: entry.name, token });
  }
}

/** `10.0.0.0/8`, `::1/128`: an address and a prefix length; anything else is CONFIG_INVALID. */
export function parseNetworks(
  entries: readonly string[],
  where: string,
  problems: string[],
): AllowedNetwork[] {
  return entries.flatMap((raw) => collect(problems, () => [parseNetwork(raw, where)], []));
}

function parseNetwork(raw: string, where: string): AllowedNetwork {
  const text = raw.trim();
  const m = /^([^/\s]+)\/(\d{1,3})$/.exec(text);
  const address = m?.[1];
  const version = address === undefined ? 0 : isIP(address);
  const prefix = m ? Number(m[2]) : Number.NaN;
  if (version === 0 || prefix > (version === 4 ? 32 : 128)) {
    throw invalid(`${where}: "${raw}" is not a network in CIDR form (e.g. 10.0.0.0/8 or fd00::/8)`);
  }
  return { text, address: address as string, prefix, family: version === 4 ? 'ipv4' : 'ipv6' };
}

export function loadTls(
  cert: string | undefined,
  key: string | undefined,
  ca: string | undefined,
): TlsMaterial | null {
  if (cert === undefined && key === undefined) {
    if (ca !== undefined) throw invalid('a TLS CA file needs a TLS certificate and key as well');
    return null;
  }
  if (cert === undefined || key === undefined)
    throw invalid('TLS needs both a certificate file and a key file');
  const material: TlsMaterial = {
    cert: Buffer.from(readText(cert, 'TLS certificate')),
    key: Buffer.from(readText(key, 'TLS key')),
    ca: ca === undefined ? undefined : Buffer.from(readText(ca, 'TLS CA file')),
  };
  try {
    tls.createSecureContext({
      cert: material.cert,
      key: material.key,
      ...(material.ca ? { ca: material.ca } : {}),
    });
  } catch (err) {
    throw invalid(`TLS certificate, key or CA cannot be used: ${(err as Error).message}`);
  }
  return material;
}
