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
import { daemonRefuses, spawnDaemon } from './helpers/kms-daemon.js';
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

test('daemon: the registry section of the file < its environment variables < the flags; paths resolve against the file', (t) => {
  const dir = tempDir();
  const file = path.join(dir, 'kms.yaml');
  writeFileSync(
    file,
    [
      'data_dir: kms',
      'registry:',
      '  url: etcds://10.0.0.1:2379,10.0.0.2:2379',
      '  cluster: chat',
      '  replica_id: kms-a',
      '  lease_ttl_seconds: 6',
      '  etcd: {ca_file: pki/ca.pem, cert_file: pki/c.pem, key_file: pki/c.key, user: kms, password_file: etcd.pw}',
      '',
    ].join('\n'),
  );
  const fromFile = loadDaemonConfig({ config: file });
  t.like(fromFile.kms, {
    registry: 'etcds://10.0.0.1:2379,10.0.0.2:2379',
    cluster: 'chat',
    replicaId: 'kms-a',
    leaseTtlSeconds: 6,
    etcdUser: 'kms',
    etcdPasswordFile: path.join(dir, 'etcd.pw'),
  });
  t.deepEqual(fromFile.kms.etcdTls, {
    caFile: path.join(dir, 'pki/ca.pem'),
    certFile: path.join(dir, 'pki/c.pem'),
    keyFile: path.join(dir, 'pki/c.key'),
  });
  t.is(fromFile.origin.registry, `file ${file}`);

  withEnv({ PROGRESSDB_KMS_CLUSTER: 'from-env', PROGRESSDB_KMS_LEASE_TTL_SECONDS: '4' }, () => {
    const fromEnv = loadDaemonConfig({ config: file });
    t.is(fromEnv.kms.cluster, 'from-env');
    t.is(fromEnv.kms.leaseTtlSeconds, 4);
    t.is(fromEnv.origin.cluster, 'env PROGRESSDB_KMS_CLUSTER');
    const fromFlags = loadDaemonConfig({
      config: file,
      registry: 'etcd://127.0.0.1:2379',
      cluster: 'from-flag',
      replicaId: 'kms-b',
      leaseTtl: 3,
    });
    t.like(fromFlags.kms, { registry: 'etcd://127.0.0.1:2379', cluster: 'from-flag', replicaId: 'kms-b' });
    t.is(fromFlags.kms.leaseTtlSeconds, 3);
    t.is(fromFlags.origin.registry, 'flag --registry');
  });

  writeFileSync(file, 'data_dir: kms\nregistry:\n  urll: etcd://x\n');
  t.throws(() => loadDaemonConfig({ config: file }), { message: /urll|unrecognized/i });
});

test('daemon CLI: a bad registry URL, replica id, lease TTL or etcd TLS file set is refused at start, naming it', async (t) => {
  const dir = tempDir();
  const common = ['--listen', '127.0.0.1:0', '--data-dir', path.join(dir, 'kms')];
  const cases: [string[], RegExp][] = [
    [['--registry', 'zookeeper://h:1'], /CONFIG_INVALID.*registry "zookeeper:\/\/h:1"/],
    [['--registry', 'etcd://127.0.0.1:1', '--replica-id', 'a b'], /CONFIG_INVALID.*replica id/],
    [['--registry', 'etcd://127.0.0.1:1', '--cluster', 'a/b'], /CONFIG_INVALID.*cluster/],
    [
      ['--registry', 'etcd://127.0.0.1:1', '--lease-ttl', '1'],
      /CONFIG_INVALID: leaseTtlSeconds must be an integer from 2/,
    ],
    [['--registry', 'etcd://127.0.0.1:1', '--etcd-ca-file', path.join(dir, 'ca.pem')], /use etcds:\/\//],
    [
      ['--registry', 'etcds://127.0.0.1:1', '--etcd-cert-file', path.join(dir, 'c.pem')],
      /certificate and key together/,
    ],
    [['--registry', 'etcd://127.0.0.1:1', '--etcd-user', 'kms'], /user and its password file together/],
  ];
  const results = await Promise.all(cases.map(([args]) => daemonRefuses([...common, ...args])));
  for (const [i, res] of results.entries()) {
    t.is(res.code, 1, `case ${i}: ${res.stderr}`);
    t.regex(res.stderr, (cases[i] as [string[], RegExp])[1]);
    t.notRegex(res.stderr, /\n\s+at /, 'no stack trace');
  }
});

test('audit_data_ops: daemon kms.audit_data_ops and server kms_audit_data_ops reach the KMS; other values are refused', (t) => {
  const dir = tempDir();
  const daemonFile = path.join(dir, 'kms.yaml');
  writeFileSync(daemonFile, 'data_dir: kms\nkms:\n  audit_data_ops: each\n');
  t.is(loadDaemonConfig({ config: daemonFile }).kms.auditDataOps, 'each');
  writeFileSync(daemonFile, 'data_dir: kms\nkms:\n  audit_data_ops: sometimes\n');
  t.throws(() => loadDaemonConfig({ config: daemonFile }), { message: /audit_data_ops/ });

  const serverFile = path.join(dir, 'server.json');
  writeFileSync(serverFile, JSON.stringify({ kms_audit_data_ops: 'each' }));
  t.is(loadConfig({ configFile: serverFile, env: {} }).kmsAuditDataOps, 'each');
  t.is(
    loadConfig({ configFile: serverFile, env: { PROGRESSDB_KMS_AUDIT_DATA_OPS: 'aggregate' } })
      .kmsAuditDataOps,
    'aggregate',
  );
  t.throws(() => loadConfig({ env: { PROGRESSDB_KMS_AUDIT_DATA_OPS: 'sometimes' } }), {
    message: /PROGRESSDB_KMS_AUDIT_DATA_OPS: .*"each"\|"aggregate"/,
  });
});
