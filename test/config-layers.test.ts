/**
 * The one configuration layering (src/config/layers.ts): file < env < flag, the origin of each
 * value, and the deprecated names (they still work, and each in use is reported once).
 */
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { loadDaemonConfig } from '../src/config/daemon.js';
import { layer } from '../src/config/layers.js';
import { loadConfig } from '../src/config/server.js';
import { spawnDaemon } from './helpers/kms-daemon.js';
import { tempDir } from './helpers/server.js';

/** Runs `fn` with these variables set in process.env (the daemon reads it), then restores it. */
function withEnv<T>(vars: Record<string, string>, fn: () => T): T {
  const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  Object.assign(process.env, vars);
  try {
    return fn();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

test('layer: a flag wins over the environment, which wins over the file; each value keeps its origin', (t) => {
  const fields = {
    a: { env: ['A'], flags: ['a'] },
    b: { env: ['B'], flags: ['b'] },
    c: { env: ['C'], flags: ['c'], file: 'nested.c' },
    d: { env: ['D'] },
  };
  const out = layer(fields, {
    file: { path: '/etc/x.yaml', values: { a: 'file-a', b: 'file-b', nested: { c: 'file-c' } } },
    env: { A: 'env-a', B: 'env-b', D: '' },
    flags: { a: 'flag-a' },
  });
  t.deepEqual(out.values, { a: 'flag-a', b: 'env-b', c: 'file-c' });
  t.deepEqual(out.origin, { a: 'flag --a', b: 'env B', c: 'file /etc/x.yaml', d: 'default' });
  t.deepEqual(out.deprecations, []);
});

test('layer: a deprecated alias works and is reported once; the canonical name wins over it', (t) => {
  const fields = { x: { env: ['NEW', 'OLD'], flags: ['new', 'old'] } };
  const alias = layer(fields, { env: { OLD: 'v' } });
  t.is(alias.values.x, 'v');
  t.is(alias.origin.x, 'env OLD');
  t.deepEqual(alias.deprecations, ['environment variable OLD is deprecated: use NEW']);

  const both = layer(fields, { env: { NEW: 'n', OLD: 'o' }, flags: { old: 'f' } });
  t.is(both.values.x, 'f');
  t.is(both.origin.x, 'flag --old');
  t.deepEqual(both.deprecations, [
    'environment variable OLD is deprecated: use NEW (ignored, NEW is set)',
    'flag --old is deprecated: use --new',
  ]);
});

test('server: origins of file, env and flag values, and a flag winning over both', (t) => {
  const file = path.join(tempDir(), 'progressdb.yaml');
  writeFileSync(file, 'addr: 127.0.0.1:7001\ndata_dir: /srv/file\nkms_timeout_ms: 2000\n');
  const config = loadConfig({
    configFile: file,
    env: { PROGRESSDB_ADDR: '127.0.0.1:7002', PROGRESSDB_DATA_DIR: '/srv/env' },
    overrides: { data_dir: '/srv/flag' },
  });
  t.is(config.port, 7002);
  t.is(config.dataDir, path.resolve('/srv/flag'));
  t.is(config.kmsTimeoutMs, 2000);
  t.is(config.origin.addr, 'env PROGRESSDB_ADDR');
  t.is(config.origin.data_dir, 'flag --data-dir');
  t.is(config.origin.kms_timeout_ms, `file ${file}`);
  t.is(config.origin.log_level, 'default');
  t.deepEqual(config.deprecations, []);
});

test('server: PROGRESSDB_KMS_TLS_CA/_CERT/_KEY still work, each reported once as deprecated', (t) => {
  const old = loadConfig({
    env: {
      PROGRESSDB_KMS_MODE: 'external',
      PROGRESSDB_KMS_TLS_CA: '/pki/ca.pem',
      PROGRESSDB_KMS_TLS_CERT: '/pki/c.pem',
      PROGRESSDB_KMS_TLS_KEY: '/pki/k.pem',
    },
  });
  t.deepEqual(old.kmsTls, { ca: '/pki/ca.pem', cert: '/pki/c.pem', key: '/pki/k.pem' });
  t.deepEqual(old.deprecations, [
    'environment variable PROGRESSDB_KMS_TLS_CA is deprecated: use PROGRESSDB_KMS_TLS_CA_FILE',
    'environment variable PROGRESSDB_KMS_TLS_CERT is deprecated: use PROGRESSDB_KMS_TLS_CERT_FILE',
    'environment variable PROGRESSDB_KMS_TLS_KEY is deprecated: use PROGRESSDB_KMS_TLS_KEY_FILE',
  ]);

  const current = loadConfig({
    env: { PROGRESSDB_KMS_TLS_CA_FILE: '/pki/new.pem', PROGRESSDB_KMS_TLS_CA: '/pki/old.pem' },
  });
  t.is(current.kmsTls.ca, '/pki/new.pem');
  t.is(current.origin.kms_tls_ca, 'env PROGRESSDB_KMS_TLS_CA_FILE');
  t.is(current.deprecations.length, 1);
});

test('daemon: listen address from the file < PROGRESSDB_KMS_LISTEN < --listen, with origins', (t) => {
  const dir = tempDir();
  const file = path.join(dir, 'kms.yaml');
  writeFileSync(file, 'endpoint: 127.0.0.1:7101\ndata_dir: kms\n');
  const fromFile = loadDaemonConfig({ config: file });
  t.is(fromFile.http.port, 7101);
  t.is(fromFile.origin.listen, `file ${file}`);
  t.is(fromFile.kms.dataDir, path.join(dir, 'kms'));

  withEnv({ PROGRESSDB_KMS_LISTEN: '127.0.0.1:7102' }, () => {
    const fromEnv = loadDaemonConfig({ config: file });
    t.is(fromEnv.http.port, 7102);
    t.is(fromEnv.origin.listen, 'env PROGRESSDB_KMS_LISTEN');
    const fromFlag = loadDaemonConfig({ config: file, listen: '127.0.0.1:7103' });
    t.is(fromFlag.http.port, 7103);
    t.is(fromFlag.origin.listen, 'flag --listen');
    t.is(fromFlag.origin.insecure, 'default');
    t.deepEqual(fromFlag.deprecations, []);
  });
});

test('daemon: PROGRESSDB_KMS_ENDPOINT and --endpoint still set the listener, each reported as deprecated', (t) => {
  const dataDir = tempDir();
  withEnv({ PROGRESSDB_KMS_ENDPOINT: '127.0.0.1:7201' }, () => {
    const fromEnv = loadDaemonConfig({ dataDir });
    t.is(fromEnv.http.port, 7201);
    t.deepEqual(fromEnv.deprecations, [
      'environment variable PROGRESSDB_KMS_ENDPOINT is deprecated: use PROGRESSDB_KMS_LISTEN',
    ]);
  });
  withEnv({ PROGRESSDB_KMS_LISTEN: '127.0.0.1:7202', PROGRESSDB_KMS_ENDPOINT: '127.0.0.1:7201' }, () => {
    t.is(loadDaemonConfig({ dataDir }).http.port, 7202);
  });
  const fromFlag = loadDaemonConfig({ dataDir, endpoint: '127.0.0.1:7203' });
  t.is(fromFlag.http.port, 7203);
  t.is(fromFlag.origin.listen, 'flag --endpoint');
  t.deepEqual(fromFlag.deprecations, ['flag --endpoint is deprecated: use --listen']);
});

test('daemon CLI: a deprecated name is logged as one warning, and the current names as none', async (t) => {
  const current = await spawnDaemon();
  t.teardown(() => current.kill9());
  t.deepEqual(
    current.logs.filter((l) => l.includes('deprecated')),
    [],
  );
  const daemon = await spawnDaemon({ listenFlag: '--endpoint' });
  t.teardown(() => daemon.kill9());
  const warnings = daemon.logs.filter((l) => l.includes('deprecated'));
  t.is(warnings.length, 1, warnings.join('\n'));
  t.regex(warnings[0]!, /flag --endpoint is deprecated: use --listen/);
});
