#!/usr/bin/env node
/**
 * progressdb-kms: the external-mode KMS daemon (`serve`, the default) and its offline tools
 * (`keygen`, `audit verify`, `rotate`, `rekey`, `cancel-deletion`, `migrate`, `backup`, `restore`). Errors are reported as one line on stderr with exit code
 * 1, never a stack trace.
 */
import { Command, InvalidArgumentError } from 'commander';
import type { ServeFlags } from '../config/daemon.js';
import { CodedError } from '../errors.js';
import { tuneHeapForThroughput } from './heap-tuning.js';
import { packageVersion, unknownCommandIn } from './version.js';

// Each sub-command loads only what it needs: keygen should not pay for Koa, LMDB and the pool.
const keygen = () => import('./kms-commands/keygen.js');
const auditVerify = () => import('./kms-commands/audit-verify.js');
const auditVerifyPublic = () => import('./kms-commands/audit-verify-public.js');
const rotate = () => import('./kms-commands/rotate.js');
const migrate = () => import('./kms-commands/migrate.js');
const backup = () => import('./kms-commands/backup.js');
const cancelDeletion = () => import('./kms-commands/cancel-deletion.js');
const rekey = () => import('./kms-commands/rekey.js');

function wholeNumber(value: string): number {
  if (!/^\d+$/.test(value)) throw new InvalidArgumentError('expected a whole number');
  return Number(value);
}

/**
 * Exits once what was written to stdout and stderr has left the process. process.exit drops a
 * write still queued on a pipe (libuv writes to a pipe at once only when it has room): seen under
 * the full test suite as a command that exited 0 with its result line missing.
 */
function exitAfterOutput(code: number): void {
  let pending = 2;
  const done = () => {
    if (--pending === 0) process.exit(code);
  };
  process.stdout.write('', done);
  process.stderr.write('', done);
}

function fail(err: unknown): void {
  const message =
    err instanceof CodedError
      ? `${err.code}: ${err.message}`
      : `unexpected error: ${err instanceof Error ? err.message : String(err)}`;
  process.stderr.write(`progressdb-kms: ${message}\n`);
  exitAfterOutput(1);
}

/** Runs a sub-command and exits with its code (0 when it returns nothing). */
function exitWith(run: () => Promise<unknown>): () => Promise<void> {
  return async () => {
    try {
      const code = await run();
      exitAfterOutput(typeof code === 'number' ? code : 0);
    } catch (err) {
      fail(err);
    }
  };
}

const program = new Command('progressdb-kms')
  .description('ProgressDB key management daemon and tools')
  .version(packageVersion(), '-V, --version')
  .showHelpAfterError();

/** The flags that say where the registry is and how to reach etcd (serve and migrate). */
function registryFlags(command: Command, registryHelp: string): Command {
  return command
    .option('--registry <url>', `${registryHelp} (env PROGRESSDB_KMS_REGISTRY)`)
    .option(
      '--cluster <name>',
      'the cluster\'s etcd key prefix (default "default"; env PROGRESSDB_KMS_CLUSTER)',
    )
    .option(
      '--etcd-ca-file <file>',
      "CA of etcd's certificates, for etcds:// (env PROGRESSDB_KMS_ETCD_CA_FILE)",
    )
    .option('--etcd-cert-file <file>', 'client certificate for etcd (env PROGRESSDB_KMS_ETCD_CERT_FILE)')
    .option('--etcd-key-file <file>', 'client certificate key for etcd (env PROGRESSDB_KMS_ETCD_KEY_FILE)')
    .option('--etcd-user <name>', 'etcd user (env PROGRESSDB_KMS_ETCD_USER)')
    .option(
      '--etcd-password-file <file>',
      "file holding the etcd user's password (env PROGRESSDB_KMS_ETCD_PASSWORD_FILE)",
    );
}

registryFlags(
  program.command('serve', { isDefault: true }),
  'lmdb (default: in the data dir) or etcd://h:p,... / etcds://h:p,... shared by the replicas of a cluster',
)
  .description('run the KMS daemon (HTTP API, optional TCP bridge)')
  .option(
    '--listen <host:port>',
    'HTTP listener, host:port or URL (env PROGRESSDB_KMS_LISTEN; default 127.0.0.1:6820)',
  )
  .option('--endpoint <host:port>', 'deprecated: use --listen')
  .option(
    '--bridge-endpoint <host:port>',
    'TCP bridge listener; off unless set (env PROGRESSDB_KMS_BRIDGE_ENDPOINT)',
  )
  .option('--data-dir <dir>', 'LMDB registry and kms-audit.log (env PROGRESSDB_KMS_DATA_DIR)')
  .option('--master-key-file <file>', 'master key, 64 hex characters (env PROGRESSDB_KMS_MASTER_KEY_FILE)')
  .option(
    '--allow-open-key-file',
    'accept a master key file that group or others can access (env PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE)',
  )
  .option('--config <file>', 'YAML or JSON config file (env PROGRESSDB_KMS_CONFIG)')
  .option('--tls-cert <file>', 'TLS certificate, PEM (env PROGRESSDB_KMS_TLS_CERT_FILE)')
  .option('--tls-key <file>', 'TLS private key, PEM (env PROGRESSDB_KMS_TLS_KEY_FILE)')
  .option(
    '--tls-ca <file>',
    'CA for client certificates; makes them required (env PROGRESSDB_KMS_TLS_CA_FILE)',
  )
  .option(
    '--max-body-bytes <n>',
    'largest HTTP request body (default: room for one call on the largest input, 64 MiB)',
    wholeNumber,
  )
  .option(
    '--max-frame-bytes <n>',
    'largest bridge frame (default: room for one call on the largest input, 64 MiB)',
    wholeNumber,
  )
  .option('--max-batch-items <n>', 'most items in one batch (default 1024)', wholeNumber)
  .option('--insecure', 'allow a non-loopback listener without TLS or tokens (not for production)')
  .option(
    '--replica-id <id>',
    "this replica's unique name (default <hostname>-<pid>; env PROGRESSDB_KMS_REPLICA_ID)",
  )
  .option(
    '--lease-ttl <seconds>',
    'etcd lease TTL: a replica cut off from etcd stops serving within it (default 10; env PROGRESSDB_KMS_LEASE_TTL_SECONDS)',
    wholeNumber,
  )
  .action((opts: ServeFlags) =>
    exitWith(async () => {
      tuneHeapForThroughput();
      return (await import('../kms-server/serve.js')).serve(opts);
    })(),
  );

program
  .command('keygen')
  .description('write a new random master key (64 hex characters)')
  .option('--out <file>', 'file to create (mode 0600); stdout when omitted')
  .option(
    '--audit-signing-key <file>',
    'instead, write an audit signing key pair: <file> (private, mode 0600) and <file>.pub (public)',
  )
  .action((opts: { out?: string; auditSigningKey?: string }) =>
    exitWith(async () => (await keygen()).keygenCommand(opts))(),
  );

// A replica's log is checked against its cluster's registry (--registry etcd://...: the audit keys
// of earlier master keys live there); --no-registry (with --public-key) checks the log alone.
// Commander takes both: --registry <url> gives a string, --no-registry false, neither undefined.
registryFlags(
  program.command('audit').description('audit log tools').command('verify'),
  "lmdb (default: the data dir's) or a cluster's etcd registry, for a replica's log: etcd://h:p,... / etcds://h:p,...",
)
  .description('verify the signatures and chain of kms-audit.log and its rolled files')
  .option('--data-dir <dir>', 'the KMS data directory (env PROGRESSDB_KMS_DATA_DIR)')
  .option('--master-key-file <file>', 'master key file (env PROGRESSDB_KMS_MASTER_KEY_FILE)')
  .option('--from <file>', 'start the chain at this rolled file (the older ones were removed on purpose)')
  .option(
    '--public-key <file>',
    'check the signed checkpoints with this public key instead (no master key needed); repeatable',
    (file: string, files: string[] = []) => [...files, file],
  )
  .option('--no-registry', "with --public-key: check the log alone, not against the registry's audit head")
  .action(
    (
      opts: Omit<import('../config/daemon-registry.js').RegistryFlags, 'registry'> & {
        dataDir?: string;
        masterKeyFile?: string;
        from?: string;
        publicKey?: string[];
        registry?: string | false;
      },
    ) =>
      exitWith(async () => {
        const { publicKey, registry } = opts;
        if (publicKey !== undefined) {
          return (await auditVerifyPublic()).auditVerifyPublicCommand({
            ...opts,
            publicKey,
            registry: registry !== false,
          });
        }
        return (await auditVerify()).auditVerifyCommand({
          ...opts,
          registry: typeof registry === 'string' ? registry : undefined,
        });
      })(),
  );

program
  .command('rotate')
  .description('rotate the KEK offline (the daemon must be stopped) and rewrap every DEK')
  .option('--data-dir <dir>', 'the KMS data directory (env PROGRESSDB_KMS_DATA_DIR)')
  .option('--master-key-file <file>', 'master key file (env PROGRESSDB_KMS_MASTER_KEY_FILE)')
  .action((opts: { dataDir?: string; masterKeyFile?: string }) =>
    exitWith(async () => (await rotate()).rotateCommand(opts))(),
  );

program
  .command('cancel-deletion')
  .description(
    'restore a key pending deletion, offline (the daemon must be stopped; live: POST /cancel_deletion)',
  )
  .option('--key-id <id>', 'the key whose deletion to cancel')
  .option('--data-dir <dir>', 'the KMS data directory (env PROGRESSDB_KMS_DATA_DIR)')
  .option('--master-key-file <file>', 'master key file (env PROGRESSDB_KMS_MASTER_KEY_FILE)')
  .action((opts: import('./kms-commands/cancel-deletion.js').CancelDeletionFlags) =>
    exitWith(async () => (await cancelDeletion()).cancelDeletionCommand(opts))(),
  );

registryFlags(
  program.command('rekey'),
  "lmdb (default: the data dir's) or a cluster's etcd registry: etcd://h:p,... / etcds://h:p,...",
)
  .description(
    're-key the master key: every KEK version rewrapped under the new key. One node: stop the KMS first. ' +
      'A cluster: its running replicas each check the new key at the same path and switch, online',
  )
  .option('--new-master-key-file <file>', 'the new master key (progressdb-kms keygen --out FILE makes one)')
  .option(
    '--data-dir <dir>',
    'the KMS data directory; for a cluster, one for this command alone (env PROGRESSDB_KMS_DATA_DIR)',
  )
  .option('--master-key-file <file>', 'the current master key file (env PROGRESSDB_KMS_MASTER_KEY_FILE)')
  .option('--allow-open-key-file', 'accept a new key file that group or others can read')
  .option(
    '--vote-timeout <seconds>',
    'a cluster: how long to wait for every running replica to accept the new key (default 30)',
    wholeNumber,
  )
  .option('--replica-id <id>', "this command's name in the cluster (default <hostname>-<pid>)")
  .option('--lease-ttl <seconds>', "a cluster: this command's etcd lease TTL (default 10)", wholeNumber)
  .action((opts: import('./kms-commands/rekey.js').RekeyFlags) =>
    exitWith(async () => (await rekey()).rekeyCommand(opts))(),
  );

registryFlags(program.command('migrate'), 'the etcd registry to copy into: etcd://h:p,... or etcds://h:p,...')
  .description('copy a single-node registry (a stopped KMS data dir) into an empty etcd cluster prefix')
  .option('--from-data-dir <dir>', 'the single-node KMS data directory (its KMS must be stopped)')
  .action((opts: import('./kms-commands/migrate.js').MigrateFlags) =>
    exitWith(async () => (await migrate()).migrateCommand(opts))(),
  );

registryFlags(
  program.command('backup'),
  "lmdb (default: the data dir's) or the etcd registry to back up: etcd://h:p,... / etcds://h:p,...",
)
  .description('write a consistent snapshot of the registry (wrapped keys only); the KMS may be running')
  .option('--data-dir <dir>', 'the KMS data directory, for an LMDB registry')
  .option('--out <file>', 'backup file to write (mode 0600, replaced atomically)')
  .action((opts: import('./kms-commands/backup.js').BackupFlags) =>
    exitWith(async () => (await backup()).backupCommand(opts))(),
  );

registryFlags(
  program.command('restore'),
  'lmdb (default: in --data-dir) or an empty etcd registry to restore into: etcd://h:p,... / etcds://h:p,...',
)
  .description('restore a backup into a new data directory or cluster prefix, once the master key unwraps it')
  .option('--in <file>', 'the backup file')
  .option('--data-dir <dir>', 'the new KMS data directory, for an LMDB registry (must not hold a registry)')
  .option('--master-key-file <file>', 'master key file (env PROGRESSDB_KMS_MASTER_KEY_FILE)')
  .action((opts: import('./kms-commands/backup.js').RestoreFlags) =>
    exitWith(async () => (await backup()).restoreCommand(opts))(),
  );

// `serve` is the default, so without this a mistyped command would be taken for serve's argument;
// commander's own refusal of a mistyped sub-command (`audit verifyy`) would be a different format.
const refusal = unknownCommandIn('progressdb-kms', process.argv.slice(2), program);
if (refusal !== null) {
  process.stderr.write(`${refusal}\n`);
  process.exit(1);
}
program.parseAsync(process.argv).catch(fail);
