import path from 'node:path';
import { z } from 'zod';
import type { AllowedNetwork, TlsMaterial, TokenEntry } from '../kms-server/auth.js';
import type { Limits } from '../kms-server/route.js';
import { DEFAULT_MAX_FRAME_BYTES } from '../wire/bridge-codec.js';
import { type Endpoint, isLoopbackHost, parseEndpoint } from '../wire/endpoint.js';
import { MAX_OP_BODY_BYTES } from '../wire/http-json.js';
import { AUDIT_DATA_OPS } from '../worker-abi/index.js';
import { collect, invalid, loadTls, loadTokens, parseNetworks, TokenSchema } from './daemon-auth.js';
import {
  REGISTRY_FIELDS,
  RegistryFileSchema,
  type RegistryFlags,
  registryOptions,
} from './daemon-registry.js';
import {
  configError,
  envValue,
  type FieldTable,
  type Layered,
  layer,
  type Origin,
  parseBool,
  parseInteger,
  readConfigFile,
} from './layers.js';
import type { KmsOptions } from './library.js';

export const DEFAULT_ENDPOINT = '127.0.0.1:6820';
export const DEFAULT_BRIDGE_PORT = 6821;
/**
 * Default HTTP body limit: a call on the largest input the KMS accepts fits (its bytes go as
 * base64, 4/3 of their size), so both transports take what the library takes. Bodies are read
 * only after the caller is authenticated.
 */
export const DEFAULT_MAX_BODY_BYTES = MAX_OP_BODY_BYTES;

/** What the `serve` sub-command's flags carry (all optional). */
export interface ServeFlags extends RegistryFlags {
  listen?: string;
  /** Deprecated alias of `listen`. */
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
  /** One log line per HTTP request (http/access-log.ts). */
  accessLog: boolean;
  kms: KmsOptions;
  /** Where each setting of FIELDS came from. */
  origin: Record<string, Origin>;
  /** Deprecated names in use, one line each, for the caller to log. */
  deprecations: string[];
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

const FileSchema = z.strictObject({
  endpoint: z.string().optional(),
  bridge_endpoint: z.string().optional(),
  data_dir: z.string().optional(),
  master_key_file: z.string().optional(),
  /** Discouraged: hex master key inline; the KMS worker reads it from this file itself. */
  tls: z
    .strictObject({ cert_file: z.string(), key_file: z.string(), ca_file: z.string().optional() })
    .optional(),
  tokens: z.array(TokenSchema).optional(),
  registry: RegistryFileSchema.optional(),
  insecure: z.boolean().optional(),
  allowed_networks: z.array(z.string()).optional(),
  drain_timeout_ms: int(0, 600_000).optional(),
  access_log: z.boolean().optional(),
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
      /** `xchacha20-poly1305` or `aes-256-gcm`: checked by createKms. */
      cipher: z.string().optional(),
      audit: z.boolean().optional(),
      audit_fsync_ms: int(0, 60_000).optional(),
      /** 0: no rollover by size; else 4096 to 256 MiB (createKms checks the lower bound). */
      audit_max_bytes: int(0, 256 * 1024 ** 2).optional(),
      audit_data_ops: z.enum(AUDIT_DATA_OPS).optional(),
      /** Ed25519 private key file (keygen --audit-signing-key); relative to the config file. */
      audit_signing_key_file: z.string().min(1).optional(),
      audit_checkpoint_lines: int(1, 10_000_000).optional(),
      audit_checkpoint_ms: int(100, 86_400_000).optional(),
      rotation_batch_size: int(1, 100_000).optional(),
      /** `90d`, `12h`, ... or `off`: checked by createKms. */
      kek_rotation_period: z.string().optional(),
      /** `7d`, `12h`, ... or `0` (destroy at once): checked by createKms. */
      deletion_window: z.union([z.string(), z.literal(0)]).optional(),
    })
    .optional(),
});

/** The file's settings, and whether it holds `master_key` (located, not parsed: readConfigFile). */
type FileConfig = z.infer<typeof FileSchema> & { hasMasterKey?: boolean };

/**
 * Every schema issue of the file is a problem; the top-level settings that are valid on their own
 * are kept, so the checks that follow report nothing about the broken ones.
 */
function loadFile(file: string, problems: string[]): FileConfig {
  const { values: raw, masterKey } = readConfigFile(file);
  const hasMasterKey = masterKey !== null;
  const parsed = FileSchema.safeParse(raw);
  if (parsed.success) return { ...parsed.data, hasMasterKey };
  for (const issue of parsed.error.issues) {
    const where = issue.path.length > 0 ? issue.path.join('.') : '(top level)';
    problems.push(`config file ${file}: ${where}: ${issue.message}`);
  }
  const shape = FileSchema.shape as Record<string, z.ZodType>;
  const kept: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(raw)) {
    const setting = Object.hasOwn(shape, key) ? shape[key]?.safeParse(value) : undefined;
    if (setting?.success) kept[key] = setting.data;
  }
  return { ...(kept as FileConfig), hasMasterKey };
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

/** A limit from a flag or the environment; out of range is a problem named by its flag. */
const limit = (flag: string, env: string, file: string) => ({
  env: [env],
  flags: [flag],
  file,
  fromEnv: parseInteger,
});

/** Settings a flag or an environment variable can set; the rest come from the file alone. */
const FIELDS = {
  listen: {
    env: ['PROGRESSDB_KMS_LISTEN', 'PROGRESSDB_KMS_ENDPOINT'],
    flags: ['listen', 'endpoint'],
    file: 'endpoint',
  },
  bridge_endpoint: { env: ['PROGRESSDB_KMS_BRIDGE_ENDPOINT'], flags: ['bridge-endpoint'] },
  data_dir: { env: ['PROGRESSDB_KMS_DATA_DIR'], flags: ['data-dir'] },
  master_key_file: { env: ['PROGRESSDB_KMS_MASTER_KEY_FILE'], flags: ['master-key-file'] },
  tls_cert: { env: ['PROGRESSDB_KMS_TLS_CERT_FILE'], flags: ['tls-cert'], file: 'tls.cert_file' },
  tls_key: { env: ['PROGRESSDB_KMS_TLS_KEY_FILE'], flags: ['tls-key'], file: 'tls.key_file' },
  tls_ca: { env: ['PROGRESSDB_KMS_TLS_CA_FILE'], flags: ['tls-ca'], file: 'tls.ca_file' },
  insecure: { env: ['PROGRESSDB_KMS_INSECURE'], flags: ['insecure'], fromEnv: parseBool },
  access_log: { env: ['PROGRESSDB_KMS_ACCESS_LOG'], fromEnv: parseBool },
  allowed_networks: {
    env: ['PROGRESSDB_KMS_ALLOWED_NETWORKS'],
    fromEnv: (text: string) => text.split(',').filter((n) => n.trim() !== ''),
  },
  max_body_bytes: limit('max-body-bytes', 'PROGRESSDB_KMS_MAX_BODY_BYTES', 'limits.max_body_bytes'),
  max_frame_bytes: limit('max-frame-bytes', 'PROGRESSDB_KMS_MAX_FRAME_BYTES', 'limits.max_frame_bytes'),
  max_batch_items: limit('max-batch-items', 'PROGRESSDB_KMS_MAX_BATCH_ITEMS', 'limits.max_batch_items'),
  ...REGISTRY_FIELDS,
} as const satisfies FieldTable;

type Field = keyof typeof FIELDS;

/** commander's camelCase option names → the flags' own kebab-case names. */
function flagValues(flags: ServeFlags): Record<string, unknown> {
  return Object.fromEntries(
    Object.entries(flags).map(([k, v]) => [k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`), v]),
  );
}

/** The settings of FIELDS, paths from the file resolved against the file's directory. */
function settings(layered: Layered, baseDir: string) {
  const get = <T>(key: Field) => layered.values[key] as T | undefined;
  const from = (key: Field): Origin => layered.origin[key] ?? 'default';
  const filePath = (key: Field) => {
    const v = get<string>(key);
    return v !== undefined && from(key).startsWith('file ') ? path.resolve(baseDir, v) : v;
  };
  return { get, filePath, from };
}

/** A limit given by flag or environment must be in range; from the file the schema checked it. */
function limitValue(
  s: ReturnType<typeof settings>,
  key: 'max_body_bytes' | 'max_frame_bytes' | 'max_batch_items',
  range: [number, number],
  fallback: number,
  problems: string[],
): number {
  const value = s.get<number>(key);
  if (value === undefined) return fallback;
  const [min, max] = range;
  if (!s.from(key).startsWith('file ') && (!Number.isInteger(value) || value < min || value > max)) {
    problems.push(`--${FIELDS[key].flags[0]} must be an integer from ${min} to ${max}`);
    return fallback;
  }
  return value;
}

export function loadDaemonConfig(flags: ServeFlags): DaemonConfig {
  const problems: string[] = [];
  const configPath = flags.config ?? envValue(process.env, 'PROGRESSDB_KMS_CONFIG');
  const file: FileConfig = configPath ? loadFile(path.resolve(configPath), problems) : {};
  const baseDir = configPath ? path.dirname(path.resolve(configPath)) : process.cwd();
  const layered = layer(FIELDS, {
    file: configPath ? { path: path.resolve(configPath), values: file } : undefined,
    env: process.env,
    flags: flagValues(flags),
  });
  problems.push(...layered.problems);
  const s = settings(layered, baseDir);

  const httpText = s.get<string>('listen') ?? DEFAULT_ENDPOINT;
  const http = collect(problems, () => listener(httpText, 6820, 'endpoint'), { host: '127.0.0.1', port: 0 });
  const bridgeText = s.get<string>('bridge_endpoint');
  const bridge =
    bridgeText === undefined
      ? null
      : collect(problems, () => listener(bridgeText, DEFAULT_BRIDGE_PORT, 'bridge endpoint'), null);

  // A problem with who may call (the file may have held it) makes the exposure check meaningless.
  const beforeAuth = problems.length;
  const cleanSoFar = beforeAuth === 0;
  const tlsFiles = [s.filePath('tls_cert'), s.filePath('tls_key'), s.filePath('tls_ca')] as const;
  const tlsConfig = collect(problems, () => loadTls(...tlsFiles), null);
  const tokens = loadTokens(file.tokens, baseDir, problems);
  const insecure = s.get<boolean>('insecure') ?? false;
  const networksFrom = s.from('allowed_networks');
  const allowedNetworks = parseNetworks(
    s.get<string[]>('allowed_networks') ?? [],
    networksFrom.startsWith('env ') ? networksFrom.slice('env '.length) : 'allowed_networks',
    problems,
  );
  const authReadable = cleanSoFar && problems.length === beforeAuth;

  const kms = kmsOptions(flags, file, s, configPath, problems);
  const limits = daemonLimits(file, s, problems);
  const config: DaemonConfig = {
    http,
    bridge,
    tls: tlsConfig,
    tokens,
    insecure,
    allowedNetworks,
    limits,
    drainTimeoutMs: file.drain_timeout_ms ?? 10_000,
    accessLog: s.get<boolean>('access_log') ?? true,
    kms,
    origin: layered.origin,
    deprecations: layered.deprecations,
  };
  if (authReadable) collect(problems, () => checkExposure(config), undefined);
  if (problems.length > 0) throw configError(problems);
  return config;
}

function kmsOptions(
  flags: ServeFlags,
  file: FileConfig,
  s: ReturnType<typeof settings>,
  configPath: string | undefined,
  problems: string[],
): KmsOptions {
  const kms: KmsOptions = {
    dataDir: s.filePath('data_dir'),
    poolSize: file.kms?.pool_size,
    maxBatch: file.kms?.max_batch,
    dekCacheSize: file.kms?.dek_cache_size,
    cipher: file.kms?.cipher,
    audit: file.kms?.audit,
    auditFsyncMs: file.kms?.audit_fsync_ms,
    auditMaxBytes: file.kms?.audit_max_bytes,
    auditDataOps: file.kms?.audit_data_ops,
    auditCheckpointLines: file.kms?.audit_checkpoint_lines,
    auditCheckpointMs: file.kms?.audit_checkpoint_ms,
    rotationBatchSize: file.kms?.rotation_batch_size,
    kekRotationPeriod: file.kms?.kek_rotation_period,
    deletionWindow: file.kms?.deletion_window,
    ...registryOptions(s.get, s.filePath),
  };
  const masterKeyFile = s.filePath('master_key_file');
  if (masterKeyFile !== undefined) kms.masterKeyFile = masterKeyFile;
  const signingKeyFile = file.kms?.audit_signing_key_file;
  // Unset, createKms falls back to PROGRESSDB_KMS_AUDIT_SIGNING_KEY_FILE.
  if (signingKeyFile !== undefined) {
    kms.auditSigningKeyFile = path.resolve(configPath ? path.dirname(configPath) : '.', signingKeyFile);
  }
  // Unset, createKms falls back to PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE.
  if (flags.allowOpenKeyFile) kms.allowOpenKeyFile = true;
  else if (file.hasMasterKey === true && configPath) kms.masterKeyConfigFile = path.resolve(configPath);
  if (kms.dataDir === undefined) {
    problems.push(
      'no data directory: pass --data-dir, set PROGRESSDB_KMS_DATA_DIR, or set data_dir in the config',
    );
  }
  return kms;
}

function daemonLimits(file: FileConfig, s: ReturnType<typeof settings>, problems: string[]): DaemonLimits {
  const maxFrameBytes = limitValue(
    s,
    'max_frame_bytes',
    [1024, 1024 ** 3],
    DEFAULT_MAX_FRAME_BYTES,
    problems,
  );
  const limits: DaemonLimits = {
    maxBodyBytes: limitValue(s, 'max_body_bytes', [1024, 1024 ** 3], DEFAULT_MAX_BODY_BYTES, problems),
    maxFrameBytes,
    maxBatchItems: limitValue(s, 'max_batch_items', [1, 100_000], 1024, problems),
    maxConnections: file.limits?.max_connections ?? 10_000,
    maxConnectionsPerAddress: file.limits?.max_connections_per_address ?? 256,
    // Room for one frame of the largest size at least, or such frames could never arrive.
    maxBufferedFrameBytes:
      file.limits?.max_buffered_frame_bytes ?? Math.max(128 * 1024 * 1024, maxFrameBytes),
    authTimeoutMs: file.limits?.auth_timeout_ms ?? 5_000,
    idleTimeoutMs: file.limits?.idle_timeout_ms ?? 60_000,
    headersTimeoutMs: file.limits?.headers_timeout_ms ?? 10_000,
    requestTimeoutMs: file.limits?.request_timeout_ms ?? 30_000,
  };
  if (limits.maxBufferedFrameBytes < limits.maxFrameBytes) {
    problems.push('limits.max_buffered_frame_bytes must be at least the largest frame (max_frame_bytes)');
  }
  if (limits.requestTimeoutMs < limits.headersTimeoutMs) {
    problems.push('limits.request_timeout_ms must be at least limits.headers_timeout_ms');
  }
  return limits;
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
    .map(([name, l]) => `${name} ${l?.host}`);
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
