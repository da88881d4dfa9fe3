/**
 * Server configuration: flags win over environment variables, which win over a `--config FILE`
 * (YAML or JSON), which wins over defaults (layers.ts). Everything is validated at start-up and every problem is reported on its own line,
 * naming the variable or config key that caused it.
 *
 * Master keys are only ever resolved to a *reference* here (a file path, an env var name, or the
 * config file path): the server's main thread never reads or keeps key bytes. A `master_key` in the
 * config file is dropped right after parsing; the KMS worker reads it from the file itself.
 */
import path from 'node:path';
import { z } from 'zod';
import { CodedError, kmsError } from '../errors.js';
import { type EndpointProblem, isLoopbackHost, parseEndpoint } from '../wire/endpoint.js';
import {
  AUDIT_DATA_OPS,
  type AuditDataOps,
  describeMasterKeyRef,
  type MasterKeyRef,
} from '../worker-abi/index.js';
import {
  configError,
  FALSE_WORDS,
  type FieldTable,
  layer,
  type Origin,
  readConfigFile,
  TRUE_WORDS,
} from './layers.js';

export { configError, readConfigFile } from './layers.js';

export type KmsMode = 'embedded' | 'external';

/** Where the embedded KMS finds the master key; never the key itself. */
export type MasterKeySource = MasterKeyRef;

export interface ApiKey {
  name: string;
  key: string;
}

export interface ServerConfig {
  dataDir: string;
  host: string;
  /** 0 asks the OS for a free port (the bound address is logged). */
  port: number;
  useEncryption: boolean;
  kmsMode: KmsMode;
  kmsDataDir: string;
  /** null when none is configured (the CLI then makes a development key in embedded mode). */
  masterKey: MasterKeySource | null;
  kmsEndpoint: string;
  kmsTls: { ca?: string; cert?: string; key?: string };
  kmsToken: string | undefined;
  kmsTimeoutMs: number;
  /** Embedded mode: the audit log's rollover size (0: none); unset, the KMS default applies. */
  kmsAuditMaxBytes: number | undefined;
  /** Embedded mode: how data-plane ops are audited; unset, the KMS default (aggregate) applies. */
  kmsAuditDataOps: AuditDataOps | undefined;
  /** Embedded mode: the audit signing key file (Ed25519, keygen --audit-signing-key), if any. */
  kmsAuditSigningKeyFile: string | undefined;
  kmsAuditCheckpointLines: number | undefined;
  kmsAuditCheckpointMs: number | undefined;
  apiKeys: ApiKey[];
  /** The admin key itself, or the file holding it; null when none is configured. */
  adminKey: { kind: 'value'; value: string } | { kind: 'file'; path: string } | null;
  /** Body paths to encrypt (e.g. `text`, `attachments.*.url`); null encrypts the whole body. */
  encryptionFields: string[][] | null;
  maxBodyBytes: number;
  /** Messages or threads handled per LMDB transaction by admin jobs (rotation, encrypt-threads). */
  jobBatchSize: number;
  /** Pause between job batches, to bound the load a job puts on the KMS and disk. */
  jobPauseMs: number;
  logLevel: string;
  /** One log line per HTTP request (http/access-log.ts). */
  accessLog: boolean;
  configFile: string | undefined;
  /** Where each setting came from, by config file key. */
  origin: Record<string, Origin>;
  /** Deprecated names in use, one line each, for the caller to log. */
  deprecations: string[];
}

export const DEFAULT_ADDR = '127.0.0.1:8080';
export const DEFAULT_KMS_ENDPOINT = '127.0.0.1:6820';
const MIN_KEY_CHARS = 16;

/**
 * Config file key → environment variables (the first to use, the others deprecated) and flags. The
 * file uses snake_case keys at the top level. The TLS files are `_FILE` like the daemon's and the
 * master key file's: `PROGRESSDB_KMS_TLS_CA` and its siblings were the server's alone.
 */
const FIELDS = {
  data_dir: { env: ['PROGRESSDB_DATA_DIR'], flags: ['data-dir'] },
  addr: { env: ['PROGRESSDB_ADDR'], flags: ['addr'] },
  use_encryption: { env: ['PROGRESSDB_USE_ENCRYPTION'] },
  kms_mode: { env: ['PROGRESSDB_KMS_MODE'] },
  kms_data_dir: { env: ['PROGRESSDB_KMS_DATA_DIR'] },
  master_key_file: { env: ['PROGRESSDB_KMS_MASTER_KEY_FILE'] },
  kms_endpoint: { env: ['PROGRESSDB_KMS_ENDPOINT'] },
  kms_tls_ca: { env: ['PROGRESSDB_KMS_TLS_CA_FILE', 'PROGRESSDB_KMS_TLS_CA'] },
  kms_tls_cert: { env: ['PROGRESSDB_KMS_TLS_CERT_FILE', 'PROGRESSDB_KMS_TLS_CERT'] },
  kms_tls_key: { env: ['PROGRESSDB_KMS_TLS_KEY_FILE', 'PROGRESSDB_KMS_TLS_KEY'] },
  kms_token: { env: ['PROGRESSDB_KMS_TOKEN'] },
  kms_timeout_ms: { env: ['PROGRESSDB_KMS_TIMEOUT_MS'] },
  kms_audit_max_bytes: { env: ['PROGRESSDB_KMS_AUDIT_MAX_BYTES'] },
  kms_audit_data_ops: { env: ['PROGRESSDB_KMS_AUDIT_DATA_OPS'] },
  kms_audit_signing_key_file: { env: ['PROGRESSDB_KMS_AUDIT_SIGNING_KEY_FILE'] },
  kms_audit_checkpoint_lines: { env: ['PROGRESSDB_KMS_AUDIT_CHECKPOINT_LINES'] },
  kms_audit_checkpoint_ms: { env: ['PROGRESSDB_KMS_AUDIT_CHECKPOINT_MS'] },
  api_keys: { env: ['PROGRESSDB_API_KEYS'] },
  admin_key: { env: ['PROGRESSDB_ADMIN_KEY'] },
  admin_key_file: { env: ['PROGRESSDB_ADMIN_KEY_FILE'] },
  encryption_fields: { env: ['PROGRESSDB_ENCRYPTION_FIELDS'] },
  max_body_bytes: { env: ['PROGRESSDB_MAX_BODY_BYTES'] },
  job_batch_size: { env: ['PROGRESSDB_JOB_BATCH_SIZE'] },
  job_pause_ms: { env: ['PROGRESSDB_JOB_PAUSE_MS'] },
  log_level: { env: ['PROGRESSDB_LOG_LEVEL'] },
  access_log: { env: ['PROGRESSDB_ACCESS_LOG'] },
} as const satisfies FieldTable;

/** Env vars that hold (or name) master key material: checked for presence only, never read. */
const MASTER_KEY_VALUE_ENV = 'PROGRESSDB_KMS_MASTER_KEY';
const MASTER_KEY_FILE_ENV = FIELDS.master_key_file.env[0];
const MASTER_KEY_ENV_NAME_ENV = 'PROGRESSDB_KMS_MASTER_KEY_ENV';

const bool = z.preprocess(
  (v) => {
    if (typeof v !== 'string') return v;
    const w = v.trim().toLowerCase();
    return TRUE_WORDS.has(w) ? true : FALSE_WORDS.has(w) ? false : v;
  },
  z.boolean({ error: 'must be true or false (true|1|yes or false|0|no)' }),
);

const int = (min: number, max: number) =>
  z.preprocess(
    (v) => (typeof v === 'string' && v.trim() !== '' ? Number(v) : v),
    z
      .number({ error: `must be an integer from ${min} to ${max}` })
      .int({ error: `must be an integer from ${min} to ${max}` })
      .min(min, { error: `must be an integer from ${min} to ${max}` })
      .max(max, { error: `must be an integer from ${min} to ${max}` }),
  );

const nonEmpty = z
  .string({ error: 'must be a non-empty string' })
  .trim()
  .min(1, 'must be a non-empty string');

/** A comma-separated string (env) or a list (file). */
const list = <T extends z.ZodType>(item: T) =>
  z.preprocess(
    (v) =>
      typeof v === 'string'
        ? v
            .split(',')
            .map((s) => s.trim())
            .filter((s) => s !== '')
        : v,
    z.array(item, { error: 'must be a list (or a comma-separated string)' }),
  );

/** `name:key`, a bare key, or {name, key}; keys are base64url/hex, so ':' cannot be part of one. */
const apiKeyEntry = z.preprocess(
  (v) => {
    if (typeof v !== 'string') return v;
    const at = v.indexOf(':');
    return at >= 0 ? { name: v.slice(0, at), key: v.slice(at + 1) } : { name: '', key: v };
  },
  z.object(
    {
      name: z.string({ error: 'each API key name must be a string' }),
      key: z
        .string({ error: 'each API key must be a string' })
        .min(MIN_KEY_CHARS, `each API key must have at least ${MIN_KEY_CHARS} characters`),
    },
    { error: 'each API key must be "name:key", a key, or {name, key}' },
  ),
);

const FIELD_PATH = /^[A-Za-z0-9_$-]+(\.([A-Za-z0-9_$-]+|\*))*$/;

const SCHEMA = z.object({
  data_dir: nonEmpty.default('./data'),
  addr: nonEmpty.default(DEFAULT_ADDR).superRefine((v, ctx) => {
    const parsed = parseAddr(v);
    if (typeof parsed === 'string') ctx.addIssue({ code: 'custom', message: parsed });
  }),
  use_encryption: bool.default(true),
  kms_mode: z
    .enum(['embedded', 'external'], { error: 'must be "embedded" or "external"' })
    .default('embedded'),
  kms_data_dir: nonEmpty.optional(),
  master_key_file: nonEmpty.optional(),
  kms_endpoint: nonEmpty.default(DEFAULT_KMS_ENDPOINT),
  kms_tls_ca: nonEmpty.optional(),
  kms_tls_cert: nonEmpty.optional(),
  kms_tls_key: nonEmpty.optional(),
  kms_token: nonEmpty.optional(),
  kms_timeout_ms: int(100, 600_000).default(10_000),
  /** 0, or 4096 to 256 MiB (createKms checks the lower bound). */
  kms_audit_max_bytes: int(0, 256 * 1024 ** 2).optional(),
  kms_audit_data_ops: z.enum(AUDIT_DATA_OPS).optional(),
  kms_audit_signing_key_file: nonEmpty.optional(),
  kms_audit_checkpoint_lines: int(1, 10_000_000).optional(),
  kms_audit_checkpoint_ms: int(100, 86_400_000).optional(),
  api_keys: list(apiKeyEntry).default([]),
  admin_key: z.string().min(MIN_KEY_CHARS, `must have at least ${MIN_KEY_CHARS} characters`).optional(),
  admin_key_file: nonEmpty.optional(),
  encryption_fields: list(
    z
      .string()
      .regex(
        FIELD_PATH,
        'each field must be a dotted path inside the body, e.g. text or attachments.*.url (a leading "body." is allowed)',
      ),
  ).optional(),
  max_body_bytes: int(1024, 64 * 1024 * 1024).default(1024 * 1024),
  job_batch_size: int(1, 10_000).default(256),
  job_pause_ms: int(0, 60_000).default(0),
  log_level: z
    .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], {
      error: 'must be one of fatal, error, warn, info, debug, trace, silent',
    })
    .default('info'),
  access_log: bool.default(true),
});

export interface LoadConfigOptions {
  configFile?: string | undefined;
  /** Command-line overrides; they win over the environment. */
  overrides?: Partial<Record<'data_dir' | 'addr', string>>;
  env?: NodeJS.ProcessEnv;
}

const ADDR_FORM = 'must be host:port (e.g. 127.0.0.1:8080)';
const ADDR_PROBLEMS: Partial<Record<EndpointProblem, string>> = {
  port: 'port must be from 0 to 65535',
  ipv6: 'bracketed host must be an IPv6 address',
};

/**
 * `host:port`, `[v6]:port` or `:port` (loopback), parsed by the one endpoint parser; here the port
 * is required and no scheme is taken. Returns a problem string on failure.
 */
export function parseAddr(addr: string): { host: string; port: number } | string {
  const text = addr.trim();
  if (!/:\d{1,5}$/.test(text)) return ADDR_FORM;
  try {
    const { host, port } = parseEndpoint(text.startsWith(':') ? `127.0.0.1${text}` : text, 0, []);
    return { host, port };
  } catch (err) {
    if (!(err instanceof CodedError)) throw err;
    return ADDR_PROBLEMS[err.details?.reason as EndpointProblem] ?? ADDR_FORM;
  }
}

/**
 * Builds the validated configuration. Throws one CONFIG_INVALID (or MASTER_KEY_REFUSED) error whose
 * message lists every problem found, one per line; `details.problems` holds them as an array.
 */
export function loadConfig(opts: LoadConfigOptions = {}): ServerConfig {
  const env = opts.env ?? process.env;
  const configFile = opts.configFile ? path.resolve(opts.configFile) : undefined;
  const contents = configFile ? readConfigFile(configFile) : { values: {}, masterKey: null };
  const fileValues = contents.values;
  const problems: string[] = [];
  for (const key of Object.keys(fileValues)) {
    if (!Object.hasOwn(FIELDS, key)) problems.push(`config file key "${key}" is not a known setting`);
  }

  const flags = { 'data-dir': opts.overrides?.data_dir, addr: opts.overrides?.addr };
  const layered = layer(FIELDS, {
    file: configFile ? { path: configFile, values: fileValues } : undefined,
    env,
    flags,
  });
  const label = (key: string) => problemLabel(key, layered.origin[key] ?? 'default');
  const parsed = SCHEMA.safeParse(layered.values);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      problems.push(`${label(String(issue.path[0] ?? ''))}: ${issue.message}`);
    }
    throw configError(problems);
  }
  const c = parsed.data;
  const addr = parseAddr(c.addr) as { host: string; port: number };
  const masterKeyFileFromEnv = layered.origin.master_key_file === `env ${MASTER_KEY_FILE_ENV}`;
  const masterKey = resolveMasterKey(
    c.master_key_file,
    masterKeyFileFromEnv,
    configFile && contents.masterKey ? { kind: 'config', path: configFile, ...contents.masterKey } : null,
    env,
    problems,
  );
  const apiKeys = checkKeys(c, addr.host, label, problems);
  if (c.kms_mode === 'external' && (c.kms_tls_cert === undefined) !== (c.kms_tls_key === undefined)) {
    problems.push('PROGRESSDB_KMS_TLS_CERT_FILE and PROGRESSDB_KMS_TLS_KEY_FILE must be given together');
  }
  if (problems.length > 0) throw configError(problems);

  if (c.kms_mode === 'external' && c.use_encryption && masterKey !== null) {
    throw kmsError(
      'MASTER_KEY_REFUSED',
      `a master key was given (${describeMasterKeyRef(masterKey)}) but PROGRESSDB_KMS_MODE is external: ` +
        'the external KMS (progressdb-kms) must hold the master key; remove it from the server configuration',
    );
  }
  return {
    ...serverConfigOf(c, addr, masterKey, apiKeys, configFile),
    origin: layered.origin,
    deprecations: layered.deprecations,
  };
}

/** How a problem names the setting: the config file key, the variable or the flag that set it. */
function problemLabel(key: string, origin: Origin): string {
  if (origin.startsWith('file ')) return `config file key "${key}"`;
  if (origin.startsWith('env ')) return origin.slice('env '.length);
  if (origin.startsWith('flag ')) return origin.slice('flag '.length);
  return key;
}

type Settings = z.infer<typeof SCHEMA>;

function checkKeys(c: Settings, host: string, label: (key: string) => string, problems: string[]): ApiKey[] {
  if (c.admin_key !== undefined && c.admin_key_file !== undefined) {
    problems.push(
      `give the admin key once: ${label('admin_key')} and ${label('admin_key_file')} are both set`,
    );
  }
  const names = new Set<string>();
  const apiKeys: ApiKey[] = c.api_keys.map((k, i) => ({ name: k.name || `key-${i + 1}`, key: k.key }));
  for (const k of apiKeys) {
    if (names.has(k.name)) problems.push(`${label('api_keys')}: API key name "${k.name}" is used twice`);
    names.add(k.name);
  }
  if (!isLoopbackHost(host) && apiKeys.length === 0) {
    problems.push(
      `${label('addr')}: refusing to listen on ${host}, beyond loopback, without API keys: ` +
        'set PROGRESSDB_API_KEYS',
    );
  }
  return apiKeys;
}

function serverConfigOf(
  c: Settings,
  addr: { host: string; port: number },
  masterKey: MasterKeySource | null,
  apiKeys: ApiKey[],
  configFile: string | undefined,
): Omit<ServerConfig, 'origin' | 'deprecations'> {
  const dataDir = path.resolve(c.data_dir);
  const { host, port } = addr;
  return {
    dataDir,
    host,
    port,
    useEncryption: c.use_encryption,
    kmsMode: c.kms_mode,
    kmsDataDir: path.resolve(c.kms_data_dir ?? path.join(dataDir, 'kms')),
    masterKey,
    kmsEndpoint: c.kms_endpoint,
    kmsTls: {
      ...(c.kms_tls_ca !== undefined && { ca: path.resolve(c.kms_tls_ca) }),
      ...(c.kms_tls_cert !== undefined && { cert: path.resolve(c.kms_tls_cert) }),
      ...(c.kms_tls_key !== undefined && { key: path.resolve(c.kms_tls_key) }),
    },
    kmsToken: c.kms_token,
    kmsTimeoutMs: c.kms_timeout_ms,
    kmsAuditMaxBytes: c.kms_audit_max_bytes,
    kmsAuditDataOps: c.kms_audit_data_ops,
    kmsAuditSigningKeyFile:
      c.kms_audit_signing_key_file === undefined ? undefined : path.resolve(c.kms_audit_signing_key_file),
    kmsAuditCheckpointLines: c.kms_audit_checkpoint_lines,
    kmsAuditCheckpointMs: c.kms_audit_checkpoint_ms,
    apiKeys,
    adminKey:
      c.admin_key !== undefined
        ? { kind: 'value', value: c.admin_key }
        : c.admin_key_file !== undefined
          ? { kind: 'file', path: path.resolve(c.admin_key_file) }
          : null,
    encryptionFields: c.encryption_fields?.length ? c.encryption_fields.map(fieldPath) : null,
    maxBodyBytes: c.max_body_bytes,
    jobBatchSize: c.job_batch_size,
    jobPauseMs: c.job_pause_ms,
    logLevel: c.log_level,
    accessLog: c.access_log,
    configFile,
  };
}

/** `body.attachments.*.url` → ['attachments', '*', 'url']: paths are relative to the body. */
function fieldPath(spec: string): string[] {
  const parts = spec.split('.');
  return parts[0] === 'body' && parts.length > 1 ? parts.slice(1) : parts;
}

function resolveMasterKey(
  fileSetting: string | undefined,
  fileSettingFromEnv: boolean,
  /** `master_key` in the config file, located (never read) by readConfigFile. */
  inConfig: MasterKeySource | null,
  env: NodeJS.ProcessEnv,
  problems: string[],
): MasterKeySource | null {
  // Presence checks only (`in`): the value of a key-holding variable is never read here.
  const fromEnv: MasterKeySource[] = [];
  if (fileSettingFromEnv && fileSetting !== undefined) {
    fromEnv.push({ kind: 'file', path: path.resolve(fileSetting) });
  }
  const envNameVar = env[MASTER_KEY_ENV_NAME_ENV];
  if (envNameVar !== undefined && envNameVar !== '') fromEnv.push({ kind: 'env', name: envNameVar });
  else if (MASTER_KEY_VALUE_ENV in env) fromEnv.push({ kind: 'env', name: MASTER_KEY_VALUE_ENV });
  if (fromEnv.length > 1) {
    problems.push(
      `give the master key once: ${MASTER_KEY_FILE_ENV} and ${MASTER_KEY_VALUE_ENV}` +
        `/${MASTER_KEY_ENV_NAME_ENV} are both set`,
    );
    return null;
  }
  if (fromEnv[0]) return fromEnv[0];
  if (fileSetting !== undefined && inConfig !== null) {
    problems.push('config file: give either master_key_file or master_key, not both');
    return null;
  }
  if (fileSetting !== undefined) return { kind: 'file', path: path.resolve(fileSetting) };
  return inConfig;
}
