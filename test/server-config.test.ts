/**
 * Configuration (in process: env wins over the file, one problem per line) and the start-up paths of
 * the built CLI: the `npm start` first run, refusals, and an unreachable external KMS.
 */

import { statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { loadConfig } from '../src/config/server.js';
import { CodedError } from '../src/errors.js';
import { cleanEnv, freePort, until } from './helpers/processes.js';
import { runCli, SERVER_CLI, tempDir } from './helpers/server.js';

function configError(fn: () => unknown): CodedError {
  try {
    fn();
  } catch (err) {
    if (err instanceof CodedError) return err;
    throw err;
  }
  throw new Error('expected a configuration error');
}

test('defaults, file values, and env winning over the file', (t) => {
  const defaults = loadConfig({ env: {} });
  t.is(defaults.host, '127.0.0.1');
  t.is(defaults.port, 8080);
  t.true(defaults.useEncryption);
  t.is(defaults.kmsMode, 'embedded');
  t.is(defaults.dataDir, path.resolve('data'));
  t.is(defaults.kmsDataDir, path.resolve('data', 'kms'));
  t.is(defaults.kmsEndpoint, '127.0.0.1:6820');
  t.is(defaults.masterKey, null);
  t.is(defaults.encryptionFields, null);

  const dir = tempDir();
  const file = path.join(dir, 'progressdb.yaml');
  writeFileSync(
    file,
    [
      'data_dir: /srv/pdb',
      'addr: 127.0.0.1:9000',
      'api_keys: ["app:0123456789abcdef", {name: other, key: fedcba9876543210}]',
      'encryption_fields: [body.text, body.attachments.*.url]',
      'master_key_file: /keys/master.key',
    ].join('\n'),
  );
  const fromFile = loadConfig({ configFile: file, env: {} });
  t.is(fromFile.dataDir, '/srv/pdb');
  t.is(fromFile.port, 9000);
  t.deepEqual(
    fromFile.apiKeys.map((k) => k.name),
    ['app', 'other'],
  );
  t.deepEqual(fromFile.encryptionFields, [['text'], ['attachments', '*', 'url']]);
  t.deepEqual(fromFile.masterKey, { kind: 'file', path: '/keys/master.key' });

  const envWins = loadConfig({
    configFile: file,
    env: {
      PROGRESSDB_ADDR: '127.0.0.1:9100',
      PROGRESSDB_USE_ENCRYPTION: 'no',
      PROGRESSDB_KMS_MASTER_KEY: 'x',
    },
  });
  t.is(envWins.port, 9100);
  t.false(envWins.useEncryption);
  t.deepEqual(
    envWins.masterKey,
    { kind: 'env', name: 'PROGRESSDB_KMS_MASTER_KEY' },
    'a reference, never the key',
  );

  // A master_key in the file is kept as its location in the file; its value is not in the config.
  writeFileSync(file, `master_key: "${'ab'.repeat(32)}"\n`);
  const inline = loadConfig({ configFile: file, env: {} });
  t.deepEqual(inline.masterKey, { kind: 'config', path: file, offset: 'master_key: '.length, length: 66 });
  t.false(JSON.stringify(inline).includes('abab'));
});

test('every problem is reported, one per line, naming its source', (t) => {
  const err = configError(() =>
    loadConfig({
      env: {
        PROGRESSDB_KMS_MODE: 'cloud',
        PROGRESSDB_USE_ENCRYPTION: 'maybe',
        PROGRESSDB_MAX_BODY_BYTES: 'lots',
        PROGRESSDB_API_KEYS: 'short',
      },
    }),
  );
  t.is(err.code, 'CONFIG_INVALID');
  const problems = err.details?.problems as string[];
  t.is(problems.length, 4);
  t.regex(err.message, /PROGRESSDB_KMS_MODE: must be "embedded" or "external"/);
  t.regex(err.message, /PROGRESSDB_USE_ENCRYPTION: must be true or false/);
  t.regex(err.message, /PROGRESSDB_MAX_BODY_BYTES: must be an integer/);
  t.regex(err.message, /PROGRESSDB_API_KEYS: each API key must have at least 16 characters/);

  t.regex(
    configError(() => loadConfig({ env: { PROGRESSDB_ADDR: 'nonsense' } })).message,
    /PROGRESSDB_ADDR: must be host:port/,
  );
  t.regex(
    configError(() => loadConfig({ env: { PROGRESSDB_ADDR: '0.0.0.0:8080' } })).message,
    /refusing to listen on 0\.0\.0\.0, beyond loopback, without API keys/,
  );
  t.notThrows(() =>
    loadConfig({ env: { PROGRESSDB_ADDR: '0.0.0.0:8080', PROGRESSDB_API_KEYS: 'a:0123456789abcdef' } }),
  );
  t.regex(
    configError(() => loadConfig({ env: { PROGRESSDB_ENCRYPTION_FIELDS: 'body..text' } })).message,
    /PROGRESSDB_ENCRYPTION_FIELDS: each field must be a dotted path/,
  );

  const dir = tempDir();
  const file = path.join(dir, 'bad.json');
  writeFileSync(file, '{"addr": 8080, "colour": "blue"}');
  const fileErr = configError(() => loadConfig({ configFile: file, env: {} }));
  t.regex(fileErr.message, /config file key "colour" is not a known setting/);
  t.regex(fileErr.message, /config file key "addr": must be a non-empty string/);
  writeFileSync(file, 'addr: [unclosed');
  t.regex(configError(() => loadConfig({ configFile: file, env: {} })).message, /not valid YAML or JSON/);
});

test('external mode refuses a master key, naming where the KMS must hold it', (t) => {
  for (const env of [
    { PROGRESSDB_KMS_MASTER_KEY_FILE: '/keys/master.key' },
    { PROGRESSDB_KMS_MASTER_KEY: 'ignored' },
  ]) {
    const err = configError(() => loadConfig({ env: { PROGRESSDB_KMS_MODE: 'external', ...env } }));
    t.is(err.code, 'MASTER_KEY_REFUSED');
    t.regex(err.message, /external KMS \(progressdb-kms\) must hold the master key/);
  }
});

test('npm start first run: dev master key (0600) and admin key, loud warning, serves encrypted', async (t) => {
  const cwd = tempDir('pdb-first-run-');
  const child = await import('node:child_process').then(({ spawn }) =>
    spawn(process.execPath, [SERVER_CLI], { cwd, env: cleanEnv({ PROGRESSDB_ADDR: '127.0.0.1:0' }) }),
  );
  t.teardown(() => child.kill('SIGKILL'));
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d));
  child.stderr.on('data', (d: Buffer) => (stderr += d));
  const url = await until('the first run to listen', () => /"url":"(http:[^"]+)"/.exec(stdout)?.[1]);

  const masterKey = path.join(cwd, 'data', 'master.key');
  const adminKey = path.join(cwd, 'data', 'admin.key');
  t.is(statSync(masterKey).mode & 0o777, 0o600);
  t.is(statSync(adminKey).mode & 0o777, 0o600);
  t.regex(stderr, /WARNING: DEVELOPMENT SET-UP/);
  t.true(stderr.includes(masterKey) && stderr.includes(adminKey), 'both paths are printed');
  t.false(stdout.includes('master_key') || /[0-9a-f]{64}/.test(stdout + stderr), 'no key material printed');
  const created = await fetch(`${url}/v1/threads`, { method: 'POST' });
  t.is(created.status, 201);
  t.true(((await created.json()) as { encrypted: boolean }).encrypted, 'encryption is on by default');

  child.kill('SIGTERM');
  const code = await new Promise((resolve) => child.on('exit', resolve));
  t.is(code, 0);
});

test('start-up refusals exit 1 with one clear line', async (t) => {
  const dir = tempDir();
  const base = { PROGRESSDB_DATA_DIR: dir, PROGRESSDB_ADDR: '127.0.0.1:0' };
  const refused = await runCli(SERVER_CLI, [], {
    env: cleanEnv({
      ...base,
      PROGRESSDB_KMS_MODE: 'external',
      PROGRESSDB_KMS_MASTER_KEY_FILE: path.join(dir, 'k'),
    }),
  });
  t.is(refused.code, 1);
  t.regex(refused.stderr, /^progressdb: MASTER_KEY_REFUSED: .*external KMS/m);

  const port = await freePort();
  const unreachable = await runCli(SERVER_CLI, [], {
    env: cleanEnv({ ...base, PROGRESSDB_KMS_MODE: 'external', PROGRESSDB_KMS_ENDPOINT: `127.0.0.1:${port}` }),
  });
  t.is(unreachable.code, 1);
  t.regex(
    unreachable.stderr,
    new RegExp(`KMS_UNAVAILABLE: cannot reach the external KMS at 127\\.0\\.0\\.1:${port}`),
  );

  const badMode = await runCli(SERVER_CLI, ['--addr', 'nope'], {
    env: cleanEnv({ ...base, PROGRESSDB_KMS_MODE: 'x' }),
  });
  t.is(badMode.code, 1);
  t.regex(badMode.stderr, /--addr: must be host:port/);
  t.regex(badMode.stderr, /PROGRESSDB_KMS_MODE: must be "embedded" or "external"/);
});
