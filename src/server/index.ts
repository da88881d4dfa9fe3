/**
 * Starts the progressdb server from a validated config: store, KMS (embedded or external), HTTP
 * listener, resumed admin jobs; and stops it gracefully.
 */
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { Socket } from 'node:net';
import type { Kms } from '../api/index.js';
import { type KmsOptions, resolveKmsOptions } from '../config/library.js';
import type { ServerConfig } from '../config/server.js';
import { kmsError, toCodedError } from '../errors.js';
import { createKms } from '../kms/index.js';
import type { Logger } from '../log.js';
import { createRemoteKms, type RemoteTlsOptions } from '../remote/index.js';
import { listenOn } from '../wire/listen.js';
import type { MasterKeyRef } from '../worker-abi/index.js';
import { createApp } from './app.js';
import { KeyRing } from './auth.js';
import { BodyCodec } from './encryption.js';
import { IdGenerator } from './ids.js';
import { JobRunner } from './jobs.js';
import { ServerMetrics } from './metrics.js';
import { ChatService } from './service.js';
import { Store } from './store.js';

/** How long a graceful stop waits for in-flight requests before closing their connections. */
const DRAIN_MS = 10_000;

export interface RunningServer {
  url: string;
  close(): Promise<void>;
  /** SIGHUP: the embedded KMS opens its audit log anew (after logrotate renamed it). */
  reopenAuditLog(): boolean;
}

/** Reads the admin key (a bearer secret for this server, not key material of the KMS). */
export function readAdminKey(config: ServerConfig): string {
  const source = config.adminKey;
  if (source === null)
    throw kmsError('CONFIG_INVALID', 'no admin key configured: set PROGRESSDB_ADMIN_KEY_FILE');
  if (source.kind === 'value') return source.value;
  let text: string;
  try {
    text = readFileSync(source.path, 'utf8').trim();
  } catch (err) {
    throw kmsError(
      'CONFIG_INVALID',
      `cannot read admin key file ${source.path}: ${(err as NodeJS.ErrnoException).code}`,
    );
  }
  if (text.length < 16)
    throw kmsError('CONFIG_INVALID', `admin key in ${source.path} is shorter than 16 characters`);
  return text;
}

/** PEM files for TLS to the external KMS (a TLS client identity, not KMS key material). */
function readTlsFiles(files: ServerConfig['kmsTls']): RemoteTlsOptions {
  const tls: RemoteTlsOptions = {};
  for (const name of ['ca', 'cert', 'key'] as const) {
    const file = files[name];
    if (file === undefined) continue;
    try {
      tls[name] = readFileSync(file);
    } catch (err) {
      throw kmsError(
        'CONFIG_INVALID',
        `cannot read KMS TLS ${name} file ${file}: ${(err as NodeJS.ErrnoException).code}`,
      );
    }
  }
  return tls;
}

async function openKms(config: ServerConfig, logger: Logger): Promise<Kms> {
  if (config.kmsMode === 'external') {
    return createRemoteKms({
      endpoint: config.kmsEndpoint,
      ...(Object.keys(config.kmsTls).length > 0 && { tls: readTlsFiles(config.kmsTls) }),
      ...(config.kmsToken !== undefined && { token: config.kmsToken }),
      timeoutMs: config.kmsTimeoutMs,
    });
  }
  return createKms({ ...embeddedKmsOptions(config), logger: logger.child({ component: 'kms' }) });
}

function embeddedKmsOptions(config: ServerConfig): KmsOptions {
  const key = config.masterKey;
  if (key === null) {
    throw kmsError('MASTER_KEY_MISSING', 'no master key configured: set PROGRESSDB_KMS_MASTER_KEY_FILE');
  }
  return {
    dataDir: config.kmsDataDir,
    ...(config.kmsAuditMaxBytes !== undefined && { auditMaxBytes: config.kmsAuditMaxBytes }),
    ...(config.kmsAuditDataOps !== undefined && { auditDataOps: config.kmsAuditDataOps }),
    ...(config.kmsAuditSigningKeyFile !== undefined && {
      auditSigningKeyFile: config.kmsAuditSigningKeyFile,
    }),
    ...(config.kmsAuditCheckpointLines !== undefined && {
      auditCheckpointLines: config.kmsAuditCheckpointLines,
    }),
    ...(config.kmsAuditCheckpointMs !== undefined && { auditCheckpointMs: config.kmsAuditCheckpointMs }),
    ...(key.kind === 'file' && { masterKeyFile: key.path }),
    ...(key.kind === 'env' && { masterKeyEnv: key.name }),
    ...(key.kind === 'config' && { masterKeyConfigFile: key.path }),
  };
}

/**
 * Checks what the configuration refers to beyond its own values (the admin key file, the external
 * KMS's TLS files, the embedded KMS's PROGRESSDB_KMS_* options) without creating anything. The CLI
 * runs it before it makes development keys, so a configuration that cannot start leaves no key file
 * behind. `devMasterKey` stands in for the master key when none is configured.
 */
export function checkStartupConfig(config: ServerConfig, devMasterKey: MasterKeyRef): void {
  if (config.adminKey !== null) readAdminKey(config);
  if (!config.useEncryption) return;
  if (config.kmsMode === 'external') readTlsFiles(config.kmsTls);
  else resolveKmsOptions(embeddedKmsOptions({ ...config, masterKey: config.masterKey ?? devMasterKey }));
}

export async function startServer(config: ServerConfig, logger: Logger): Promise<RunningServer> {
  const adminKey = readAdminKey(config);
  const store = Store.open(config.dataDir);
  let kms: Kms | null = null;
  try {
    if (!config.useEncryption && store.holdsEncryptedData()) {
      throw kmsError(
        'CONFIG_INVALID',
        `the data dir ${config.dataDir} holds encrypted threads: start with PROGRESSDB_USE_ENCRYPTION=true`,
      );
    }
    if (config.useEncryption) {
      kms = await openKms(config, logger);
      await checkKms(kms, config);
    }
    return await listen(config, logger, store, kms, adminKey);
  } catch (err) {
    await kms?.close().catch(() => undefined);
    await store.close().catch(() => undefined);
    throw err;
  }
}

async function checkKms(kms: Kms, config: ServerConfig): Promise<void> {
  const where = config.kmsMode === 'external' ? `external KMS at ${config.kmsEndpoint}` : 'embedded KMS';
  try {
    const health = await kms.health();
    if (!health.ok) throw kmsError('KMS_UNAVAILABLE', `${where} reports it is not ready`);
  } catch (thrown) {
    const err = toCodedError(thrown);
    throw kmsError(
      err.code === 'INTERNAL' ? 'KMS_UNAVAILABLE' : err.code,
      `cannot reach the ${where}: ${err.message}`,
    );
  }
}

async function listen(
  config: ServerConfig,
  logger: Logger,
  store: Store,
  kms: Kms | null,
  adminKey: string,
): Promise<RunningServer> {
  const metrics = new ServerMetrics();
  const codec = new BodyCodec(kms, config.encryptionFields);
  const service = new ChatService(store, kms, codec, new IdGenerator(), metrics, logger, config.jobBatchSize);
  const jobs = new JobRunner(service, metrics, logger, config.jobBatchSize, config.jobPauseMs);
  const app = createApp({
    config,
    service,
    jobs,
    kms,
    keys: new KeyRing(config.apiKeys, adminKey),
    metrics,
    logger,
    startedAt: new Date(),
  });

  const server: Server = createServer(app.callback());
  const sockets = new Set<Socket>();
  server.on('connection', (s) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  const address = await listenOn(server, config.host, config.port, 'address');
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  const url = `http://${host}:${address.port}`;
  jobs.resumeAll();
  logger.info(
    {
      url,
      encryption: config.useEncryption,
      kmsMode: config.useEncryption ? config.kmsMode : null,
      dataDir: config.dataDir,
      fieldPolicy: config.encryptionFields?.map((p) => p.join('.')) ?? 'whole body',
    },
    'progressdb listening',
  );

  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      const drained = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeIdleConnections();
      const timer = setTimeout(() => {
        for (const s of sockets) s.destroy();
      }, DRAIN_MS);
      await drained;
      clearTimeout(timer);
      service.stopDeletionChecks();
      await jobs.stop();
      await kms?.close();
      await store.close();
      logger.info('progressdb stopped');
    })();
    return closing;
  };
  return { url, close, reopenAuditLog: () => kms?.reopenAuditLog?.() ?? false };
}
