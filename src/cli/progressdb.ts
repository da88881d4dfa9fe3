#!/usr/bin/env node
/**
 * `progressdb`: the chat-thread server (what `npm start` runs).
 *
 * Encryption is on unless PROGRESSDB_USE_ENCRYPTION says otherwise. On a first run with no keys
 * configured it makes a development set-up in the data dir: a master key file (made inside a KMS
 * worker thread; this process never sees its bytes) and an admin key file, both mode 0600, and says
 * loudly that this is not a production set-up.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Command } from 'commander';
import { loadConfig, type ServerConfig } from '../config/server.js';
import { toCodedError } from '../errors.js';
import { generateMasterKeyFile } from '../kms/index.js';
import { createLogger } from '../log.js';
import { checkStartupConfig, startServer } from '../server/index.js';
import { tuneHeapForThroughput } from './heap-tuning.js';
import { packageVersion } from './version.js';

interface CliOptions {
  config?: string;
  addr?: string;
  dataDir?: string;
}

/** Where a first development run keeps the keys it makes. */
function developmentKeyFile(config: ServerConfig, name: 'admin.key' | 'master.key'): string {
  return path.join(config.dataDir, name);
}

/**
 * Creates what a first development run needs, once the configuration is known to be good; returns
 * the files it relies on.
 */
async function developmentSetup(config: ServerConfig): Promise<{ masterKey?: string; adminKey?: string }> {
  const made: { masterKey?: string; adminKey?: string } = {};
  if (config.adminKey === null) {
    const file = developmentKeyFile(config, 'admin.key');
    if (!existsSync(file)) {
      writeFileSync(file, `${randomBytes(32).toString('base64url')}\n`, { mode: 0o600, flag: 'wx' });
    }
    config.adminKey = { kind: 'file', path: file };
    made.adminKey = file;
  }
  if (config.useEncryption && config.kmsMode === 'embedded' && config.masterKey === null) {
    const file = developmentKeyFile(config, 'master.key');
    if (!existsSync(file)) await generateMasterKeyFile(file);
    config.masterKey = { kind: 'file', path: file };
    made.masterKey = file;
  }
  return made;
}

function warnDevelopment(made: { masterKey?: string; adminKey?: string }): void {
  const lines = [
    '',
    '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!',
    '!!  WARNING: DEVELOPMENT SET-UP. DO NOT USE IN PRODUCTION.',
    ...(made.masterKey
      ? [
          `!!  Master key:  ${made.masterKey}`,
          '!!    It sits next to the data it protects. In production keep it elsewhere and set',
          '!!    PROGRESSDB_KMS_MASTER_KEY_FILE, or run an external KMS (PROGRESSDB_KMS_MODE=external).',
          '!!    Losing this file makes every encrypted message unreadable.',
        ]
      : []),
    ...(made.adminKey
      ? [
          `!!  Admin key:   ${made.adminKey}`,
          '!!    Use it as "Authorization: Bearer <key>" on /admin/* and /metrics.',
          '!!    In production set PROGRESSDB_ADMIN_KEY_FILE.',
        ]
      : []),
    '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!',
    '',
  ];
  process.stderr.write(`${lines.join('\n')}\n`);
}

async function main(opts: CliOptions): Promise<void> {
  tuneHeapForThroughput();
  const config = loadConfig({
    configFile: opts.config,
    overrides: {
      ...(opts.addr !== undefined && { addr: opts.addr }),
      ...(opts.dataDir !== undefined && { data_dir: opts.dataDir }),
    },
  });
  // Everything is checked before the development set-up writes a key file.
  checkStartupConfig(config, { kind: 'file', path: developmentKeyFile(config, 'master.key') });
  const logger = createLogger('progressdb', config.logLevel);
  for (const line of config.deprecations) logger.warn(line);
  mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
  const made = await developmentSetup(config);
  if (made.masterKey || made.adminKey) {
    warnDevelopment(made);
    logger.warn({ masterKeyFile: made.masterKey, adminKeyFile: made.adminKey }, 'development set-up in use');
  }
  const server = await startServer(config, logger);

  let signals = 0;
  const stop = (signal: string) => {
    if (++signals > 1) process.exit(1);
    logger.info({ signal }, 'shutting down');
    server.close().then(
      () => process.exit(0),
      (err: unknown) => {
        logger.error({ code: toCodedError(err).code }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  // logrotate renames the embedded KMS's audit log, then sends SIGHUP: new lines go to a new file.
  process.on('SIGHUP', () => {
    logger.info({ signal: 'SIGHUP' }, 'reopening the audit log');
    server.reopenAuditLog();
  });
}

const program = new Command()
  .name('progressdb')
  .description('ProgressDB: chat threads and messages, encrypted at rest with per-thread keys')
  .version(packageVersion(), '-V, --version')
  .option('-c, --config <file>', 'YAML or JSON config file (environment variables win over it)')
  .option('--addr <host:port>', 'listen address (PROGRESSDB_ADDR, default 127.0.0.1:8080)')
  .option('--data-dir <dir>', 'data directory (PROGRESSDB_DATA_DIR, default ./data)')
  .action(async (opts: CliOptions) => {
    try {
      await main(opts);
    } catch (thrown) {
      const err = toCodedError(thrown);
      const message = err.code === 'INTERNAL' && err.cause instanceof Error ? err.cause.message : err.message;
      process.stderr.write(`progressdb: ${err.code}: ${message}\n`);
      process.exit(1);
    }
  });

await program.parseAsync(process.argv);
