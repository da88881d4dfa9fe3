/**
 * Daemon configuration: command-line flags, then PROGRESSDB_KMS_* environment variables, then the
 * config file (YAML or JSON, validated with zod; unknown keys are errors so typos do not pass
 * silently), then defaults. Every problem found (schema issues and the checks below) is listed in one
 * CONFIG_INVALID error, one line each, as the server's configuration does (src/config.ts).
 *
 * The master key is never read here: only its source (a file path, or this config file when it
 * holds `master_key`) is handed to createKms, whose worker reads it.
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { z } from 'zod';
import { configError, readConfigFile } from '../config.js';
import { CodedError, kmsError } from '../errors.js';
import { givenKmsDataDir, type KmsOptions } from '../kms/options.js';
import { DEFAULT_MAX_FRAME_BYTES } from '../wire/bridge-codec.js';
import { type Endpoint, isLoopbackHost, parseEndpoint } from '../wire/endpoint.js';
import { MAX_OP_BODY_BYTES } from '../wire/http-json.js';
import type { AllowedNetwork, TlsMaterial, TokenEntry } from './auth.js';
import type { Limits } from './route.js';

export const DEFAULT_ENDPOINT = '127.0.0.1:6820';
export const DEFAULT_BRIDGE_PORT = 6821;
const MIN_TOKEN_LENGTH = 16;
/**
 * Longest token, in bytes. Before a bridge connection is authenticated it may send only an AUTH
 * frame of PRE_AUTH_FRAME_BYTES (bridge.ts), which must hold the longest token.
 */
export const MAX_TOKEN_BYTES = 1024;
/**
 * Default HTTP body limit: a call on the largest input the KMS accepts fits (its bytes go as
 * base64, 4/3 of their size), so both transports take what the library takes. Bodies are read
 * only after the caller is authenticated.
 */
export const DEFAULT_MAX_BODY_BYTES = MAX_OP_BODY_BYTES;

/** What the `serve` sub-command's flags carry (all optional). */
export interface ServeFlags {
  endpoint?: string;
  bridgeEndpoint?: string;
  dataDir?: string;
  masterKeyFile?: string;
  allowOpenKeyFile?: boolean;
  config?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  maxBodyBytes?: number;
  maxFrameBytes?: number;
  maxBatchItems?: number;
  insecure?: boolean;
}

export interface ListenerConfig {
  host: string;
  port: number;
}

export interface DaemonConfig {
  http: ListenerConfig;
  /** The TCP bridge listener; null when not configured. */
  bridge: ListenerConfig | null;
  tls: TlsMaterial | null;
  tokens: TokenEntry[];
  insecure: boolean;
  /** Callers in these networks are authorized by their address (auth.ts). */
  allowedNetworks: AllowedNetwork[];
  limits: DaemonLimits;
  /** How long shutdown waits for in-flight requests before closing connections. */
  drainTimeoutMs: number;
  kms: KmsOptions;
}

/** Limits of the listeners themselves (connections and their timeouts), beside the request limits. */
export interface DaemonLimits extends Limits {
  maxConnections: number;
  /** Open connections from one remote address, per listener; more are closed at once. */
  maxConnectionsPerAddress: number;
  /** Bytes of unfinished bridge frames held across all connections. */
  maxBufferedFrameBytes: number;
  /** A bridge connection that needs an AUTH frame and sends none this long is closed. */
  authTimeoutMs: number;
  /** A connection with nothing in flight and no bytes this long is closed (both listeners). */
  idleTimeoutMs: number;
  /** HTTP: the whole request head must arrive within this time, and the whole request within the next. */
  headersTimeoutMs: number;
  requestTimeoutMs: number;
}

const int = (min: number, max: number) => z.number().int().min(min).max(max);

const TokenSchema = z
  .strictObject({
    name: z.string().min(1).max(128),
    token: z.string().optional(),
    token_file: z.string().optional(),
  })
  .refine((t) => (t.token === undefined) !== (t.token_file === undefined), {
    message: 'give exactly one of token or token_file',
  });

const FileSchema = z.strictObject({
  endpoint: z.string().optional(),
  bridge_endpoint: z.string().optional(),
  data_dir: z.string().optional(),
  master_key_file: z.string().optional(),
  /** Discouraged: hex master key inline; the KMS worker reads it from this file itself. */
  master_key: z.string().optional(),
  tls: z
    .strictObject({ cert_file: z.string(), key_file: z.string(), ca_file: z.string().optional() })
    .optional(),
  tokens: z.array(TokenSchema).optional(),
  insecure: z.boolean().optional(),
  allowed_networks: z.array(z.string()).optional(),
  drain_timeout_ms: int(0, 600_000).optional(),
  limits: z
    .strictObject({
      max_body_bytes: int(1024, 1024 ** 3).optional(),
      max_frame_bytes: int(1024, 1024 ** 3).optional(),
      max_batch_items: int(1, 100_000).optional(),
      max_connections: int(1, 1_000_000).optional(),
      max_connections_per_address: int(1, 1_000_000).optional(),
      max_buffered_frame_bytes: int(1024, 1024 ** 4).optional(),
      auth_timeout_ms: int(50, 600_000).optional(),
      idle_timeout_ms: int(50, 24 * 3_600_000).optional(),
      headers_timeout_ms: int(50, 600_000).optional(),
      request_timeout_ms: int(50, 3_600_000).optional(),
    })
    .optional(),
  kms: z
    .strictObject({
      pool_size: int(1, 256).optional(),
      max_batch: int(1, 4096).optional(),
      dek_cache_size: int(1, 10_000_000).optional(),
      audit: z.boolean().optional(),
      audit_fsync_ms: int(0, 60_000).optional(),
      rotation_batch_size: int(1, 100_000).optional(),
    })
    .optional(),
});

type FileConfig = z.infer<typeof FileSchema>;

function invalid(message: string): Error {
  return kmsError('CONFIG_INVALID', message);
}

function env(name: string): string | undefined {
  const v = process.env[name];
  return v === undefined || v === '' ? undefined : v;
}

/** Runs one check; a CONFIG_INVALID it throws becomes a problem and `fallback` stands in for its value. */
function collect<T>(problems: string[], check: () => T, fallback: T): T {
  try {
    return check();
  } catch (err) {
    if (!(err instanceof CodedError) || err.code !== 'CONFIG_INVALID') throw err;
    problems.push(...((err.details?.problems as string[] | undefined) ?? [err.message]));
    return fallback;
  }
}

function readText(file: string, what: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch (err) {
    throw invalid(`cannot read ${what} ${file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
  }
}

/**
 * Every schema issue of the file is a problem; the top-level settings that are valid on their own
 * are kept, so the checks that follow report nothing about the broken ones.
 */
function loadFile(file: string, problems: string[]): FileConfig {
  const raw = readConfigFile(file);
  const parsed = FileSchema.safeParse(raw);
  if (parsed.success) return parsed.data;
  for (const issue of parsed.error.issues) {
    const where = issue.path.length > 0 ? issue.path.join('.') : '(top level)';
    problems.push(`config file ${file}: ${where}: ${issue.message}`);
  }
  const shape = FileSchema.shape as Record<string, z.ZodType>;
  const kept: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(raw)) {
    const setting = Object.hasOwn(shape, key) ? shape[key]!.safeParse(value) : undefined;
    if (setting?.success) kept[key] = setting.data;
  }
  return kept as FileConfig;
}

function loadTokens(entries: FileConfig['tokens'], baseDir: string, problems: string[]): TokenEntry[] {
  const tokens: TokenEntry[] = [];
  const names = new Set<string>();
  for (const entry of entries ?? []) collect(problems, () => loadToken(entry), undefined);
  return tokens;

  function loadToken(entry: NonNullable<FileConfig['tokens']>[number]): void {
    const token =
      entry.token ??
      readText(path.resolve(baseDir, entry.token_file!), `token file of "${entry.name}"`).trim();
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
function parseNetworks(entries: readonly string[], where: string, problems: string[]): AllowedNetwork[] {
  return entries.flatMap((raw) => collect(problems, () => [parseNetwork(raw, where)], []));
}

function parseNetwork(raw: string, where: string): AllowedNetwork {
  const text = raw.trim();
  const m = /^([^/\s]+)\/(\d{1,3})$/.exec(text);
  const version = m ? isIP(m[1]!) : 0;
  const prefix = m ? Number(m[2]) : Number.NaN;
  if (version === 0 || prefix > (version === 4 ? 32 : 128)) {
    throw invalid(`${where}: "${raw}" is not a network in CIDR form (e.g. 10.0.0.0/8 or fd00::/8)`);
  }
  return { text, address: m![1]!, prefix, family: version === 4 ? 'ipv4' : 'ipv6' };
}

function loadTls(
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

function listener(text: string, defaultPort: number, what: string): ListenerConfig {
  let ep: Endpoint;
  try {
    ep = parseEndpoint(text, defaultPort);
  } catch (err) {
    throw invalid(`${what}: ${(err as Error).message}`);
  }
  if (ep.scheme === 'tcp' && what === 'endpoint') throw invalid('endpoint: use --bridge-endpoint for tcp://');
  return { host: ep.host, port: ep.port };
}

/** A limit's flag, else its environment variable; out of range is a problem, and undefined then. */
function limitFlag(
  problems: string[],
  name: string,
  flagValue: number | undefined,
  envName: string,
  min: number,
  max: number,
): number | undefined {
  return collect(
    problems,
    () => {
      const value = flagValue ?? envInt(envName);
      if (value === undefined) return undefined;
      if (!Number.isInteger(value) || value < min || value > max) {
        throw invalid(`${name} must be an integer from ${min} to ${max}`);
      }
      return value;
    },
    undefined,
  );
}

function envInt(name: string): number | undefined {
  const v = env(name);
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v)) throw invalid(`${name} must be a whole number, got "${v}"`);
  return Number(v);
}

function envBool(name: string): boolean | undefined {
  const v = env(name)?.toLowerCase();
  if (v === undefined) return undefined;
  if (['1', 'true', 'yes', 'on'].includes(v)) return true;
  if (['0', 'false', 'no', 'off'].includes(v)) return false;
  throw invalid(`${name} must be true or false`);
}

export function loadDaemonConfig(flags: ServeFlags): DaemonConfig {
  const problems: string[] = [];
  const configPath = flags.config ?? env('PROGRESSDB_KMS_CONFIG');
  const file: FileConfig = configPath ? loadFile(path.resolve(configPath), problems) : {};
  const baseDir = configPath ? path.dirname(path.resolve(configPath)) : process.cwd();
  const fromFile = (p: string | undefined) => (p === undefined ? undefined : path.resolve(baseDir, p));

  const httpText = flags.endpoint ?? env('PROGRESSDB_KMS_ENDPOINT') ?? file.endpoint ?? DEFAULT_ENDPOINT;
  const http = collect(problems, () => listener(httpText, 6820, 'endpoint'), { host: '127.0.0.1', port: 0 });
  const bridgeText = flags.bridgeEndpoint ?? env('PROGRESSDB_KMS_BRIDGE_ENDPOINT') ?? file.bridge_endpoint;
  const bridge =
    bridgeText === undefined
      ? null
      : collect(problems, () => listener(bridgeText, DEFAULT_BRIDGE_PORT, 'bridge endpoint'), null);

  // A problem with who may call (the file may have held it) makes the exposure check meaningless.
  const beforeAuth = problems.length;
  const cleanSoFar = beforeAuth === 0;
  const tlsFiles = [
    flags.tlsCert ?? env('PROGRESSDB_KMS_TLS_CERT_FILE') ?? fromFile(file.tls?.cert_file),
    flags.tlsKey ?? env('PROGRESSDB_KMS_TLS_KEY_FILE') ?? fromFile(file.tls?.key_file),
    flags.tlsCa ?? env('PROGRESSDB_KMS_TLS_CA_FILE') ?? fromFile(file.tls?.ca_file),
  ] as const;
  const tlsConfig = collect(problems, () => loadTls(...tlsFiles), null);
  const tokens = loadTokens(file.tokens, baseDir, problems);
  const insecure =
    flags.insecure ??
    collect(problems, () => envBool('PROGRESSDB_KMS_INSECURE'), undefined) ??
    file.insecure ??
    false;
  const networksEnv = env('PROGRESSDB_KMS_ALLOWED_NETWORKS');
  const allowedNetworks =
    networksEnv !== undefined
      ? parseNetworks(
          networksEnv.split(',').filter((n) => n.trim() !== ''),
          'PROGRESSDB_KMS_ALLOWED_NETWORKS',
          problems,
        )
      : parseNetworks(file.allowed_networks ?? [], 'allowed_networks', problems);
  const authReadable = cleanSoFar && problems.length === beforeAuth;

  const masterKeyFile =
    flags.masterKeyFile ?? env('PROGRESSDB_KMS_MASTER_KEY_FILE') ?? fromFile(file.master_key_file);
  const kms: KmsOptions = {
    dataDir: givenKmsDataDir(flags.dataDir) ?? fromFile(file.data_dir),
    poolSize: file.kms?.pool_size,
    maxBatch: file.kms?.max_batch,
    dekCacheSize: file.kms?.dek_cache_size,
    audit: file.kms?.audit,
    auditFsyncMs: file.kms?.audit_fsync_ms,
    rotationBatchSize: file.kms?.rotation_batch_size,
  };
  if (masterKeyFile !== undefined) kms.masterKeyFile = masterKeyFile;
  // Unset, createKms falls back to PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE.
  if (flags.allowOpenKeyFile) kms.allowOpenKeyFile = true;
  else if (file.master_key !== undefined && configPath) kms.masterKeyConfigFile = path.resolve(configPath);
  if (kms.dataDir === undefined) {
    problems.push(
      'no data directory: pass --data-dir, set PROGRESSDB_KMS_DATA_DIR, or set data_dir in the config',
    );
  }

  const limits = {
    maxBodyBytes:
      limitFlag(
        problems,
        '--max-body-bytes',
        flags.maxBodyBytes,
        'PROGRESSDB_KMS_MAX_BODY_BYTES',
        1024,
        1024 ** 3,
      ) ??
      file.limits?.max_body_bytes ??
      DEFAULT_MAX_BODY_BYTES,
    maxFrameBytes:
      limitFlag(
        problems,
        '--max-frame-bytes',
        flags.maxFrameBytes,
        'PROGRESSDB_KMS_MAX_FRAME_BYTES',
        1024,
        1024 ** 3,
      ) ??
      file.limits?.max_frame_bytes ??
      DEFAULT_MAX_FRAME_BYTES,
    maxBatchItems:
      limitFlag(
        problems,
        '--max-batch-items',
        flags.maxBatchItems,
        'PROGRESSDB_KMS_MAX_BATCH_ITEMS',
        1,
        100_000,
      ) ??
      file.limits?.max_batch_items ??
      1024,
    maxConnections: file.limits?.max_connections ?? 10_000,
    maxConnectionsPerAddress: file.limits?.max_connections_per_address ?? 256,
    maxBufferedFrameBytes: 0,
    authTimeoutMs: file.limits?.auth_timeout_ms ?? 5_000,
    idleTimeoutMs: file.limits?.idle_timeout_ms ?? 60_000,
    headersTimeoutMs: file.limits?.headers_timeout_ms ?? 10_000,
    requestTimeoutMs: file.limits?.request_timeout_ms ?? 30_000,
  };
  // Room for one frame of the largest size at least, or such frames could never arrive.
  limits.maxBufferedFrameBytes =
    file.limits?.max_buffered_frame_bytes ?? Math.max(128 * 1024 * 1024, limits.maxFrameBytes);
  if (limits.maxBufferedFrameBytes < limits.maxFrameBytes) {
    problems.push('limits.max_buffered_frame_bytes must be at least the largest frame (max_frame_bytes)');
  }
  if (limits.requestTimeoutMs < limits.headersTimeoutMs) {
    problems.push('limits.request_timeout_ms must be at least limits.headers_timeout_ms');
  }

  const config: DaemonConfig = {
    http,
    bridge,
    tls: tlsConfig,
    tokens,
    insecure,
    allowedNetworks,
    limits,
    drainTimeoutMs: file.drain_timeout_ms ?? 10_000,
    kms,
  };
  if (authReadable) collect(problems, () => checkExposure(config), undefined);
  if (problems.length > 0) throw configError(problems);
  return config;
}

/**
 * Listeners other machines can reach need an authenticated caller (client certificates, tokens or
 * allowed networks), unless --insecure says otherwise. TLS alone is not enough: it hides the
 * traffic but lets anyone call.
 */
export function exposedListeners(config: DaemonConfig): string[] {
  const protectedByConfig =
    config.tls?.ca !== undefined || config.tokens.length > 0 || config.allowedNetworks.length > 0;
  if (protectedByConfig) return [];
  const named: [string, ListenerConfig | null][] = [
    ['endpoint', config.http],
    ['bridge endpoint', config.bridge],
  ];
  return named
    .filter(([, l]) => l !== null && !isLoopbackHost(l.host))
    .map(([name, l]) => `${name} ${l!.host}`);
}

function checkExposure(config: DaemonConfig): void {
  const exposed = exposedListeners(config);
  if (exposed.length > 0 && !config.insecure) {
    throw invalid(
      `refusing to listen on non-loopback ${exposed.join(' and ')} without authenticated callers ` +
        '(configure client certificates (tls ca_file), tokens or allowed_networks, or pass --insecure)',
    );
  }
}
