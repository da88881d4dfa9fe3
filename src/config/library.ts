/**
 * createKms() options and their PROGRESSDB_KMS_* environment fallbacks (an option wins over its
 * variable), resolved to one validated object. The master key is resolved to a *reference* (file
 * path, env var name or config file path): this module never reads, decodes or keeps the key
 * itself; only the worker does.
 */
import { availableParallelism, hostname } from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { kmsError } from '../errors.js';
import { CIPHERS, type CipherName, DEFAULT_CIPHER } from '../format.js';
import { DEFAULT_LEASE_TTL_SECONDS, MIN_LEASE_TTL_SECONDS } from '../kms/registry/etcd-membership.js';
import {
  ETCD_MAX_ROTATION_BATCH,
  ETCD_ROTATION_BATCH,
  type EtcdTlsFiles,
  type RegistryOptions,
  registryLocation,
} from '../kms/registry/location.js';
import { type KmsClock, parseDuration, SYSTEM_CLOCK } from '../kms/rotation-schedule.js';
import type { Logger } from '../log.js';
import {
  AUDIT_DATA_OPS,
  type AuditCheckpointPolicy,
  type AuditDataOps,
  type MasterKeyRef,
} from '../worker-abi/index.js';
import { envBool, envInt, envValue, readConfigFile } from './layers.js';

export interface KmsOptions {
  /** LMDB registry and kms-audit.log live here. Env: PROGRESSDB_KMS_DATA_DIR. */
  dataDir?: string;
  /** File holding the master key as 64 hex characters. Env: PROGRESSDB_KMS_MASTER_KEY_FILE. */
  masterKeyFile?: string;
  /**
   * Accept a master key file that group or others can access; refused by default, as ssh refuses
   * such a private key. Env: PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE. Default false.
   */
  allowOpenKeyFile?: boolean;
  /**
   * Name of an environment variable holding the master key as hex (discouraged). Env:
   * PROGRESSDB_KMS_MASTER_KEY_ENV; if neither this nor a file is given and
   * PROGRESSDB_KMS_MASTER_KEY is set, that variable is used.
   */
  masterKeyEnv?: string;
  /** A JSON/YAML config file whose `master_key` field holds hex (discouraged). */
  masterKeyConfigFile?: string;
  /** Crypto worker threads. Env: PROGRESSDB_KMS_POOL_SIZE. Default: available parallelism. */
  poolSize?: number;
  /** Max operations coalesced into one worker task. Env: PROGRESSDB_KMS_MAX_BATCH. Default 256. */
  maxBatch?: number;
  /**
   * How long (µs) a crypto worker that finished a task spins for the next one before it parks;
   * waking a parked thread costs tens of µs on a VM. Adaptive and bounded (see
   * workers/idle-spin.ts). 0 disables. Env: PROGRESSDB_KMS_WORKER_SPIN_US. Default 150.
   */
  idleSpinUs?: number;
  /** Unwrapped DEK versions cached per worker. Env: PROGRESSDB_KMS_DEK_CACHE_SIZE. Default 10000. */
  dekCacheSize?: number;
  /**
   * The cipher new ciphertexts and wrapped keys are written in: `xchacha20-poly1305` (libsodium;
   * 192-bit random nonces) or `aes-256-gcm` (node:crypto; for deployments bound to FIPS-approved
   * algorithms). Data in either format is always read. Env: PROGRESSDB_KMS_CIPHER. Default
   * xchacha20-poly1305.
   */
  cipher?: string;
  /** Write the signed audit log. Env: PROGRESSDB_KMS_AUDIT (false|0|no disables). Default true. */
  audit?: boolean;
  /** Group fsync interval of the audit log in ms. Env: PROGRESSDB_KMS_AUDIT_FSYNC_MS. Default 50. */
  auditFsyncMs?: number;
  /**
   * How encrypt, decrypt and reencrypt are audited: `aggregate` writes one signed line per (key,
   * op, KEK version, caller, outcome) in each worker block, with the exact `count`; `each` writes
   * a line per operation. Control-plane operations always get a line each.
   * Env: PROGRESSDB_KMS_AUDIT_DATA_OPS. Default aggregate.
   */
  auditDataOps?: AuditDataOps;
  /**
   * Roll `kms-audit.log` over to `kms-audit.log.NNNNNN` once it holds this many bytes (at least
   * 4096, at most 256 MiB); 0 never rolls (for logrotate). Env: PROGRESSDB_KMS_AUDIT_MAX_BYTES.
   * Default 128 MiB.
   */
  auditMaxBytes?: number;
  /**
   * The audit signing key (Ed25519 private key file made by `progressdb-kms keygen
   * --audit-signing-key`): with it, each worker stream appends signed checkpoints that `audit
   * verify --public-key` checks without the master key. Read only inside the workers, like the
   * master key file (mode 0600 required unless allowOpenKeyFile). Off when not given.
   * Env: PROGRESSDB_KMS_AUDIT_SIGNING_KEY_FILE.
   */
  auditSigningKeyFile?: string;
  /** A checkpoint after this many lines of a stream. Env: PROGRESSDB_KMS_AUDIT_CHECKPOINT_LINES. Default 1000. */
  auditCheckpointLines?: number;
  /**
   * Or once a stream's oldest line not yet covered is this old, in ms (idle workers are asked
   * too). Env: PROGRESSDB_KMS_AUDIT_CHECKPOINT_MS. Default 60000.
   */
  auditCheckpointMs?: number;
  /** DEK records rewrapped per worker task and transaction during KEK rotation. Default 2000 (40 on etcd). Env: PROGRESSDB_KMS_ROTATION_BATCH_SIZE. */
  rotationBatchSize?: number;
  /**
   * Resume an interrupted KEK rotation in the background at start-up, and run scheduled ones
   * (kekRotationPeriod). Default true; the offline commands turn it off.
   */
  resumeRotation?: boolean;
  /**
   * Rotate the KEK by itself when the active version is older than this: `90d`, `12h`, `30m`
   * (or milliseconds). Off by default. Env: PROGRESSDB_KMS_KEK_ROTATION_PERIOD.
   */
  kekRotationPeriod?: string | number;
  /**
   * How long destroyDek waits before it destroys a key: `7d`, `12h`, `30m` (or milliseconds);
   * meanwhile the key is refused for every use (KEY_PENDING_DELETION) and cancelDeletion restores
   * it. `0` destroys at once. Env: PROGRESSDB_KMS_DELETION_WINDOW. Default 7d.
   */
  deletionWindow?: string | number;
  /** The clock of scheduled work (KEK rotation, deletion windows); tests inject one. Default: the system clock. */
  clock?: KmsClock;
  /**
   * Where the registry lives: `lmdb` (in dataDir; the default) or the etcd cluster several KMS
   * replicas share, `etcd://host:port,...` or `etcds://...` (TLS). Env: PROGRESSDB_KMS_REGISTRY.
   */
  registry?: string;
  /** This KMS cluster's key prefix in etcd (`/progressdb-kms/<cluster>/`). Env: PROGRESSDB_KMS_CLUSTER. */
  cluster?: string;
  /**
   * This replica's name in the cluster: its member key, its locks and its audit lines. Unique per
   * replica; 1-64 letters, digits, `.`, `_`, `:` or `-`. Default `<hostname>-<pid>`.
   * Env: PROGRESSDB_KMS_REPLICA_ID.
   */
  replicaId?: string;
  /** etcds:// CA, client certificate and key files. Env: PROGRESSDB_KMS_ETCD_{CA,CERT,KEY}_FILE. */
  etcdTls?: EtcdTlsFiles;
  /** etcd user and a file holding its password. Env: PROGRESSDB_KMS_ETCD_USER, _ETCD_PASSWORD_FILE. */
  etcdUser?: string;
  etcdPasswordFile?: string;
  /**
   * etcd lease TTL of a cluster replica, in seconds: a replica cut off from etcd stops serving
   * within it, and a dead replica's rotation is resumed by another within it. Default 10.
   * Env: PROGRESSDB_KMS_LEASE_TTL_SECONDS.
   */
  leaseTtlSeconds?: number;
  logger?: Logger;
}

export interface ResolvedKmsOptions {
  dataDir: string;
  masterKey: MasterKeyRef;
  poolSize: number;
  maxBatch: number;
  idleSpinUs: number;
  dekCacheSize: number;
  cipher: CipherName;
  audit: boolean;
  auditFsyncMs: number;
  auditDataOps: AuditDataOps;
  /** null: no rollover by size. */
  auditMaxBytes: number | null;
  /** null: no audit signing key, no checkpoints. */
  auditCheckpoints: AuditCheckpointPolicy | null;
  rotationBatchSize: number;
  resumeRotation: boolean;
  /** null: no scheduled rotation. */
  kekRotationPeriodMs: number | null;
  /** 0: destroyDek destroys at once. */
  deletionWindowMs: number;
  clock: KmsClock;
  registry: RegistryOptions;
}

/**
 * Largest rollover size: the verifier reads a file whole, and a JavaScript string holds at most
 * about 512 MiB.
 */
const MAX_AUDIT_MAX_BYTES = 256 * 1024 ** 2;

/** The integer options: their environment variable (first the option, then it) and range. */
const INT_FIELDS = {
  poolSize: { env: 'PROGRESSDB_KMS_POOL_SIZE', min: 1, max: 256 },
  maxBatch: { env: 'PROGRESSDB_KMS_MAX_BATCH', min: 1, max: 4096 },
  idleSpinUs: { env: 'PROGRESSDB_KMS_WORKER_SPIN_US', min: 0, max: 10_000 },
  dekCacheSize: { env: 'PROGRESSDB_KMS_DEK_CACHE_SIZE', min: 1, max: 10_000_000 },
  auditFsyncMs: { env: 'PROGRESSDB_KMS_AUDIT_FSYNC_MS', min: 0, max: 60_000 },
  auditMaxBytes: { env: 'PROGRESSDB_KMS_AUDIT_MAX_BYTES', min: 0, max: MAX_AUDIT_MAX_BYTES },
  auditCheckpointLines: { env: 'PROGRESSDB_KMS_AUDIT_CHECKPOINT_LINES', min: 1, max: 10_000_000 },
  auditCheckpointMs: { env: 'PROGRESSDB_KMS_AUDIT_CHECKPOINT_MS', min: 100, max: 86_400_000 },
  rotationBatchSize: { env: 'PROGRESSDB_KMS_ROTATION_BATCH_SIZE', min: 1, max: 100_000 },
  leaseTtlSeconds: { env: 'PROGRESSDB_KMS_LEASE_TTL_SECONDS', min: MIN_LEASE_TTL_SECONDS, max: 300 },
} as const satisfies Record<string, { env: string | undefined; min: number; max: number }>;

type IntField = keyof typeof INT_FIELDS;

const INT_SCHEMAS = Object.fromEntries(
  Object.entries(INT_FIELDS).map(([key, f]) => [key, z.number().int().min(f.min).max(f.max)]),
) as Record<IntField, z.ZodNumber>;

/** The option, else its environment variable, else `fallback`; out of range names where it came from. */
function intOption(opts: KmsOptions, key: IntField, fallback: number): number {
  const { env, min, max } = INT_FIELDS[key];
  const given = opts[key];
  const fromEnv = given === undefined && env !== undefined ? envInt(env) : undefined;
  const value = given ?? fromEnv ?? fallback;
  if (!INT_SCHEMAS[key].safeParse(value).success) {
    const from = given === undefined && fromEnv !== undefined ? env : key;
    throw kmsError('CONFIG_INVALID', `${from} must be an integer from ${min} to ${max}, got ${value}`);
  }
  return value;
}

const envString = (name: string) => envValue(process.env, name);

/** `master_key` of a config file, located for the worker to read (readConfigFile). */
function configKeyRef(file: string): MasterKeyRef {
  const { masterKey } = readConfigFile(file);
  if (masterKey === null)
    throw kmsError('MASTER_KEY_MISSING', `master_key in config file ${file} is missing`);
  return { kind: 'config', path: file, ...masterKey };
}

/** Picks exactly one master key source; more than one is a configuration error, not a guess. */
export function resolveMasterKeyRef(opts: KmsOptions): MasterKeyRef {
  const file = opts.masterKeyFile ?? envString('PROGRESSDB_KMS_MASTER_KEY_FILE');
  const envName = opts.masterKeyEnv ?? envString('PROGRESSDB_KMS_MASTER_KEY_ENV');
  const configFile = opts.masterKeyConfigFile;
  const given = [file, envName, configFile].filter((v) => v !== undefined);
  if (given.length > 1) {
    throw kmsError(
      'CONFIG_INVALID',
      'give exactly one master key source: a key file, an environment variable name, or a config file',
    );
  }
  if (file !== undefined) {
    const allowOpen = opts.allowOpenKeyFile ?? envBool('PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE') ?? false;
    return { kind: 'file', path: path.resolve(file), allowOpen };
  }
  if (envName !== undefined) return { kind: 'env', name: envName };
  if (configFile !== undefined) return configKeyRef(path.resolve(configFile));
  // `in` asks whether the variable exists without materialising its value in this heap.
  if ('PROGRESSDB_KMS_MASTER_KEY' in process.env) return { kind: 'env', name: 'PROGRESSDB_KMS_MASTER_KEY' };
  throw kmsError(
    'MASTER_KEY_MISSING',
    'no master key configured: set PROGRESSDB_KMS_MASTER_KEY_FILE (a file with 64 hex characters; ' +
      'create one with `progressdb-kms keygen --out FILE`)',
  );
}

/**
 * Ops per worker task by default. Batches grow only when ops queue faster than workers finish
 * (a lone caller's op still leaves alone), so a larger cap costs nothing at light load and, under
 * load, spreads each task's fixed cost (hand-off, audit block, MAC, write) over more ops: 256
 * against 64 measured -9% CPU per op over 10,000 Zipf keys and -20% on one key, at 256 callers.
 * A task of 256 ops of 1 KiB keeps a worker busy well under a millisecond.
 */
const DEFAULT_MAX_BATCH = 256;

/** Ops per worker task (option, else PROGRESSDB_KMS_MAX_BATCH, else DEFAULT_MAX_BATCH). */
export function resolveMaxBatch(opts: KmsOptions): number {
  return intOption(opts, 'maxBatch', DEFAULT_MAX_BATCH);
}

/** The KMS data directory given, else PROGRESSDB_KMS_DATA_DIR: every entry point resolves it here. */
export function givenKmsDataDir(given: string | undefined): string | undefined {
  return given ?? envString('PROGRESSDB_KMS_DATA_DIR');
}

export function resolveKmsOptions(opts: KmsOptions = {}): ResolvedKmsOptions {
  const dataDir = givenKmsDataDir(opts.dataDir);
  if (dataDir === undefined) {
    throw kmsError('CONFIG_INVALID', 'no KMS data directory: pass dataDir or set PROGRESSDB_KMS_DATA_DIR');
  }
  const poolSize = intOption(opts, 'poolSize', Math.max(1, availableParallelism()));
  const registry = resolveRegistry(opts);
  const rotationBatchSize = intOption(
    opts,
    'rotationBatchSize',
    registry.url === undefined ? 2000 : ETCD_ROTATION_BATCH,
  );
  if (registry.url !== undefined && rotationBatchSize > ETCD_MAX_ROTATION_BATCH) {
    throw kmsError(
      'CONFIG_INVALID',
      `rotationBatchSize must be at most ${ETCD_MAX_ROTATION_BATCH} with an etcd registry (one etcd transaction per batch)`,
    );
  }
  return {
    dataDir: path.resolve(dataDir),
    masterKey: resolveMasterKeyRef(opts),
    poolSize,
    maxBatch: resolveMaxBatch(opts),
    idleSpinUs: intOption(opts, 'idleSpinUs', 150),
    dekCacheSize: intOption(opts, 'dekCacheSize', 10_000),
    cipher: resolveCipher(opts.cipher ?? envString('PROGRESSDB_KMS_CIPHER')),
    audit: opts.audit ?? envBool('PROGRESSDB_KMS_AUDIT') ?? true,
    auditFsyncMs: intOption(opts, 'auditFsyncMs', 50),
    auditDataOps: resolveAuditDataOps(opts.auditDataOps ?? envString('PROGRESSDB_KMS_AUDIT_DATA_OPS')),
    auditMaxBytes: resolveAuditMaxBytes(opts),
    auditCheckpoints: resolveAuditCheckpoints(opts),
    rotationBatchSize: intOption(
      opts,
      'rotationBatchSize',
      registry.url === undefined ? 2000 : ETCD_ROTATION_BATCH,
    ),
    resumeRotation: opts.resumeRotation ?? true,
    kekRotationPeriodMs: resolvePeriod(
      opts.kekRotationPeriod ?? envString('PROGRESSDB_KMS_KEK_ROTATION_PERIOD'),
    ),
    deletionWindowMs: resolveDeletionWindow(
      opts.deletionWindow ?? envString('PROGRESSDB_KMS_DELETION_WINDOW'),
    ),
    clock: opts.clock ?? SYSTEM_CLOCK,
    registry,
  };
}

/**
 * The default: `aggregate`. A worker stamps every line of a block with one timestamp, so the lines
 * `each` writes for the same key, op, KEK version, caller and outcome in a block differ only in
 * their sequence number: aggregating them loses nothing an auditor can use and, measured by
 * `npm run bench:keys`, cuts the log's bytes per operation (bench/results/keys.md).
 */
export const DEFAULT_AUDIT_DATA_OPS: AuditDataOps = 'aggregate';

function resolveAuditDataOps(given: string | undefined): AuditDataOps {
  if (given === undefined) return DEFAULT_AUDIT_DATA_OPS;
  const mode = given.trim().toLowerCase();
  if ((AUDIT_DATA_OPS as readonly string[]).includes(mode)) return mode as AuditDataOps;
  throw kmsError(
    'CONFIG_INVALID',
    `auditDataOps must be one of ${AUDIT_DATA_OPS.join(', ')}, got ${JSON.stringify(given)}`,
  );
}

function resolveCipher(given: string | undefined): CipherName {
  if (given === undefined) return DEFAULT_CIPHER;
  const name = given.trim().toLowerCase();
  if (Object.hasOwn(CIPHERS, name)) return name as CipherName;
  throw kmsError(
    'CONFIG_INVALID',
    `cipher must be one of ${Object.keys(CIPHERS).join(', ')}, got ${JSON.stringify(given)}`,
  );
}

/** The default deletion window: a week, long enough to notice a mistaken delete after a weekend. */
export const DEFAULT_DELETION_WINDOW_MS = 7 * 86_400_000;

function resolveDeletionWindow(given: string | number | undefined): number {
  if (given === undefined) return DEFAULT_DELETION_WINDOW_MS;
  if (typeof given === 'number') {
    if (!Number.isSafeInteger(given) || given < 0) {
      throw kmsError(
        'CONFIG_INVALID',
        `deletionWindow must be 0 or a positive number of milliseconds, got ${given}`,
      );
    }
    return given;
  }
  return given.trim() === '0' ? 0 : parseDuration(given, 'deletionWindow');
}

/** The signing key's path (the workers read the file) and when checkpoints are due; null when off. */
function resolveAuditCheckpoints(opts: KmsOptions): AuditCheckpointPolicy | null {
  const file = opts.auditSigningKeyFile ?? envString('PROGRESSDB_KMS_AUDIT_SIGNING_KEY_FILE');
  const lines = intOption(opts, 'auditCheckpointLines', 1000);
  const ms = intOption(opts, 'auditCheckpointMs', 60_000);
  if (file === undefined) return null;
  const allowOpen = opts.allowOpenKeyFile ?? envBool('PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE') ?? false;
  return { signingKey: { path: path.resolve(file), allowOpen }, lines, ms };
}

/** Smallest rollover size: a file per few blocks would only make the chain hard to read. */
const MIN_AUDIT_MAX_BYTES = 4096;
const DEFAULT_AUDIT_MAX_BYTES = 128 * 1024 ** 2;

function resolveAuditMaxBytes(opts: KmsOptions): number | null {
  const bytes = intOption(opts, 'auditMaxBytes', DEFAULT_AUDIT_MAX_BYTES);
  if (bytes === 0) return null;
  if (bytes < MIN_AUDIT_MAX_BYTES) {
    throw kmsError(
      'CONFIG_INVALID',
      `auditMaxBytes must be 0 (no rollover) or at least ${MIN_AUDIT_MAX_BYTES}, got ${bytes}`,
    );
  }
  return bytes;
}

function resolvePeriod(given: string | number | undefined): number | null {
  if (given === undefined || given === 'off') return null;
  if (typeof given === 'number') {
    if (!Number.isSafeInteger(given) || given <= 0) {
      throw kmsError(
        'CONFIG_INVALID',
        `kekRotationPeriod must be a positive number of milliseconds, got ${given}`,
      );
    }
    return given;
  }
  return parseDuration(given, 'kekRotationPeriod');
}

/** The registry options and their env fallbacks, checked (registryLocation) but not connected. */
export function resolveRegistry(opts: KmsOptions): RegistryOptions {
  const url = opts.registry ?? envString('PROGRESSDB_KMS_REGISTRY');
  const registry: RegistryOptions = {};
  if (url === undefined || url.trim() === 'lmdb') return registry;
  const tls = opts.etcdTls ?? {};
  const etcdTls: EtcdTlsFiles = {};
  const caFile = tls.caFile ?? envString('PROGRESSDB_KMS_ETCD_CA_FILE');
  const certFile = tls.certFile ?? envString('PROGRESSDB_KMS_ETCD_CERT_FILE');
  const keyFile = tls.keyFile ?? envString('PROGRESSDB_KMS_ETCD_KEY_FILE');
  if (caFile !== undefined) etcdTls.caFile = path.resolve(caFile);
  if (certFile !== undefined) etcdTls.certFile = path.resolve(certFile);
  if (keyFile !== undefined) etcdTls.keyFile = path.resolve(keyFile);
  registry.url = url;
  registry.etcdTls = etcdTls;
  registry.leaseTtlSeconds = intOption(opts, 'leaseTtlSeconds', DEFAULT_LEASE_TTL_SECONDS);
  const cluster = opts.cluster ?? envString('PROGRESSDB_KMS_CLUSTER');
  registry.replicaId =
    opts.replicaId ?? envString('PROGRESSDB_KMS_REPLICA_ID') ?? `${hostname()}-${process.pid}`;
  const user = opts.etcdUser ?? envString('PROGRESSDB_KMS_ETCD_USER');
  const passwordFile = opts.etcdPasswordFile ?? envString('PROGRESSDB_KMS_ETCD_PASSWORD_FILE');
  if (cluster !== undefined) registry.cluster = cluster;
  if (user !== undefined) registry.etcdUser = user;
  if (passwordFile !== undefined) registry.etcdPasswordFile = path.resolve(passwordFile);
  registryLocation(registry);
  return registry;
}
