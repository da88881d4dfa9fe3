/**
 * Start-up errors of both programs as an operator sees them: a listener that cannot bind (port in
 * use, address not on this machine, permission denied) exits 1 with one line that has a stable code
 * and names the address, never INTERNAL or a stack. The offline tools find their data directory
 * the way `serve` does. A bad daemon configuration lists every problem at once, and YAML syntax
 * errors name their line and column. The server creates its development keys only once the whole
 * configuration is known to be good.
 */

import { existsSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import path from 'node:path';
import test from 'ava';
import { loadDaemonConfig } from '../src/config/daemon.js';
import { loadConfig } from '../src/config/server.js';
import { CodedError } from '../src/errors.js';
import { generateMasterKeyFile } from '../src/kms/index.js';
import { listenError } from '../src/wire/listen.js';
import { daemonRefuses, keygen } from './helpers/kms-daemon.js';
import { cleanEnv } from './helpers/processes.js';
import { KMS_CLI, runCli, SERVER_CLI, tempDir } from './helpers/server.js';

/** A loopback port held open for the whole test. */
async function busyPort(t: { teardown: (fn: () => void) => void }): Promise<number> {
  const holder: Server = createServer();
  await new Promise<void>((resolve) => holder.listen(0, '127.0.0.1', resolve));
  t.teardown(() => holder.close());
  return (holder.address() as { port: number }).port;
}

function refusedWithOneLine(
  t: { is: (a: unknown, b: unknown, m?: string) => void; regex: (s: string, r: RegExp, m?: string) => void },
  res: { code: number | null; stderr: string },
  line: RegExp,
) {
  t.is(res.code, 1, res.stderr);
  const lines = res.stderr.trim().split('\n');
  t.is(lines.length, 1, res.stderr);
  t.regex(lines[0]!, line);
  t.is(/INTERNAL|unexpected error|\n\s+at /.test(res.stderr), false, res.stderr);
}

test('daemon: a busy HTTP or bridge port is ADDRESS_IN_USE naming the listener and address', async (t) => {
  const port = await busyPort(t);
  const dataDirArgs = async () => {
    const dir = tempDir('pdb-kms-listen-');
    return ['--data-dir', path.join(dir, 'kms'), '--master-key-file', await keygen(dir)];
  };
  const [httpBusy, bridgeBusy] = await Promise.all([
    dataDirArgs().then((args) => daemonRefuses(['--listen', `127.0.0.1:${port}`, ...args])),
    dataDirArgs().then((args) =>
      daemonRefuses(['--listen', '127.0.0.1:0', '--bridge-endpoint', `127.0.0.1:${port}`, ...args]),
    ),
  ]);
  refusedWithOneLine(
    t,
    httpBusy,
    new RegExp(
      `^progressdb-kms: ADDRESS_IN_USE: cannot listen on endpoint 127\\.0\\.0\\.1:${port}: .*in use`,
    ),
  );
  refusedWithOneLine(
    t,
    bridgeBusy,
    new RegExp(`^progressdb-kms: ADDRESS_IN_USE: cannot listen on bridge endpoint 127\\.0\\.0\\.1:${port}: `),
  );
});

// The tests run as root here, where binding port 1 succeeds, so the bind refusal exercised end to
// end is EADDRNOTAVAIL (192.0.2.1 is a documentation address no machine has); EACCES is checked on
// the mapping below.
test('daemon: an address not on this machine is LISTEN_FAILED', async (t) => {
  const dir = tempDir('pdb-kms-listen-');
  const res = await daemonRefuses([
    '--listen',
    '192.0.2.1:6820',
    '--insecure',
    '--data-dir',
    path.join(dir, 'kms'),
    '--master-key-file',
    await keygen(dir),
  ]);
  refusedWithOneLine(
    t,
    res,
    /^progressdb-kms: LISTEN_FAILED: cannot listen on endpoint 192\.0\.2\.1:6820: .*not assigned .*\(EADDRNOTAVAIL\)$/,
  );
});

test('a bind refusal maps to a code and a reason for every errno, permission denied included', (t) => {
  const denied = listenError('endpoint', '0.0.0.0', 1, Object.assign(new Error('x'), { code: 'EACCES' }));
  t.is(denied.code, 'LISTEN_FAILED');
  t.regex(denied.message, /^cannot listen on endpoint 0\.0\.0\.0:1: permission denied .*\(EACCES\)$/);
  const v6 = listenError('address', '::1', 8080, Object.assign(new Error('x'), { code: 'EADDRINUSE' }));
  t.is(v6.code, 'ADDRESS_IN_USE');
  t.regex(v6.message, /^cannot listen on address \[::1\]:8080: /);
  t.is(listenError('address', 'h', 1, new Error('odd')).code, 'LISTEN_FAILED');
});

test('server: a busy port is ADDRESS_IN_USE and a foreign address LISTEN_FAILED', async (t) => {
  const port = await busyPort(t);
  const dataDir = tempDir();
  const masterKeyFile = path.join(dataDir, 'master.key');
  await generateMasterKeyFile(masterKeyFile);
  const env = (extra: Record<string, string>) =>
    cleanEnv({
      PROGRESSDB_DATA_DIR: dataDir,
      PROGRESSDB_ADMIN_KEY: 'admin-0123456789abcdef',
      PROGRESSDB_KMS_POOL_SIZE: '1',
      ...extra,
    });
  // One after the other: both use the same data dir.
  const busy = await runCli(SERVER_CLI, ['--addr', `127.0.0.1:${port}`], {
    env: env({ PROGRESSDB_KMS_MASTER_KEY_FILE: masterKeyFile }),
  });
  const foreign = await runCli(SERVER_CLI, ['--addr', '192.0.2.1:8080'], {
    env: env({ PROGRESSDB_API_KEYS: 'a:0123456789abcdef', PROGRESSDB_USE_ENCRYPTION: 'false' }),
  });
  refusedWithOneLine(
    t,
    busy,
    new RegExp(`^progressdb: ADDRESS_IN_USE: cannot listen on address 127\\.0\\.0\\.1:${port}: .*in use`),
  );
  refusedWithOneLine(
    t,
    foreign,
    /^progressdb: LISTEN_FAILED: cannot listen on address 192\.0\.2\.1:8080: .*\(EADDRNOTAVAIL\)$/,
  );
});

test('rotate and audit verify take the data directory from PROGRESSDB_KMS_DATA_DIR like serve', async (t) => {
  const dir = tempDir('pdb-kms-envdir-');
  const env = cleanEnv({
    PROGRESSDB_KMS_DATA_DIR: path.join(dir, 'kms'),
    PROGRESSDB_KMS_MASTER_KEY_FILE: await keygen(dir),
    PROGRESSDB_KMS_POOL_SIZE: '1',
  });
  const rotated = await runCli(KMS_CLI, ['rotate'], { env });
  t.is(rotated.code, 0, rotated.stderr);
  t.regex(rotated.stdout, /^rotation complete: KEK version 2 active/);
  // Not a terminal: plain progress lines, the last one at 100%.
  t.regex(rotated.stderr, /^0\/0 keys \(100\.0%\), 0\/s, in \d+s$/m);
  const verified = await runCli(KMS_CLI, ['audit', 'verify'], { env });
  t.is(verified.code, 0, verified.stdout + verified.stderr);
  t.true(
    verified.stdout.startsWith(`ok: `) && verified.stdout.includes(path.join(dir, 'kms')),
    verified.stdout,
  );

  const nowhere = await runCli(KMS_CLI, ['audit', 'verify'], { env: cleanEnv() });
  refusedWithOneLine(
    t,
    nowhere,
    /^progressdb-kms: CONFIG_INVALID: no data directory: pass --data-dir or set PROGRESSDB_KMS_DATA_DIR$/,
  );
});

function configProblems(load: () => unknown): string[] {
  try {
    load();
  } catch (err) {
    if (err instanceof CodedError && err.code === 'CONFIG_INVALID') return err.details?.problems as string[];
    throw err;
  }
  throw new Error('expected CONFIG_INVALID');
}

test('daemon config: every problem of the file, the flags and our own checks in one CONFIG_INVALID', (t) => {
  const dir = tempDir('pdb-kms-cfg-');
  const file = path.join(dir, 'kms.yaml');
  writeFileSync(
    file,
    [
      'endpont: 127.0.0.1:1',
      'limits: { max_connections: 0, request_timeout_ms: 100, headers_timeout_ms: 200 }',
      'tokens: [{ name: a, token: short }, { name: b, token: long-enough-token-0123 }, { name: b, token: long-enough-token-4567 }]',
      'allowed_networks: [10.0.0.0/33, 10.0.0.0/8, nonsense]',
      '',
    ].join('\n'),
  );
  const problems = configProblems(() =>
    loadDaemonConfig({ config: file, maxBodyBytes: 12, tlsCert: path.join(dir, 'missing.crt') }),
  );
  const expected = [
    /endpont/,
    /limits\.max_connections: .*>=1/,
    /token "a" must be at least 16 characters/,
    /token name "b" is used twice/,
    /"10\.0\.0\.0\/33" is not a network/,
    /"nonsense" is not a network/,
    /TLS needs both a certificate file and a key file/,
    /no data directory/,
    /--max-body-bytes must be an integer from 1024/,
  ];
  t.is(problems.length, expected.length, problems.join('\n'));
  for (const re of expected)
    t.true(
      problems.some((p) => re.test(p)),
      `${re} in\n${problems.join('\n')}`,
    );
  // The limits block was invalid as a whole, so the cross-check of its timeouts did not run on it.
  t.false(problems.some((p) => p.includes('request_timeout_ms must be')));

  const noDir = configProblems(() => loadDaemonConfig({ maxFrameBytes: 1, maxBatchItems: 0 }));
  t.deepEqual(
    noDir.map((p) => p.split(' ')[0]),
    ['no', '--max-frame-bytes', '--max-batch-items'],
    noDir.join('\n'),
  );
});

test('YAML syntax errors name line:column, each on its own line, for the daemon and the server', async (t) => {
  const dir = tempDir('pdb-yaml-');
  const file = path.join(dir, 'bad.yaml');
  writeFileSync(file, 'data_dir: /tmp/x\ndata_dir: /tmp/y\nkms: { pool_size: 1, pool_size: 2 }\n');
  for (const problems of [
    configProblems(() => loadDaemonConfig({ config: file })),
    configProblems(() => loadConfig({ configFile: file, env: {} })),
  ]) {
    t.is(problems.length, 2, problems.join('\n'));
    t.regex(problems[0]!, /bad\.yaml is not valid YAML or JSON: line 2:1: Map keys must be unique$/);
    t.regex(problems[1]!, /bad\.yaml is not valid YAML or JSON: line 3:22: Map keys must be unique$/);
  }

  const key = await keygen(dir);
  const res = await daemonRefuses(['--config', file, '--master-key-file', key]);
  t.is(res.code, 1);
  t.deepEqual(
    res.stderr
      .trim()
      .split('\n')
      .map((l) => l.replace(/: .*/, '')),
    [
      'progressdb-kms',
      '  - config file ' + file + ' is not valid YAML or JSON',
      '  - config file ' + file + ' is not valid YAML or JSON',
    ],
    res.stderr,
  );
});

test('server: a configuration that cannot start creates no development key', async (t) => {
  const cases: [Record<string, string>, RegExp][] = [
    [{ PROGRESSDB_ADMIN_KEY_FILE: '/nonexistent/admin.key' }, /cannot read admin key file \/nonexistent/],
    [{ PROGRESSDB_KMS_POOL_SIZE: 'many' }, /PROGRESSDB_KMS_POOL_SIZE must be an integer/],
  ];
  const results = await Promise.all(
    cases.map(async ([extra]) => {
      const dataDir = path.join(tempDir(), 'data');
      const res = await runCli(SERVER_CLI, ['--addr', '127.0.0.1:0'], {
        env: cleanEnv({ PROGRESSDB_DATA_DIR: dataDir, ...extra }),
      });
      return { res, dataDir };
    }),
  );
  results.forEach(({ res, dataDir }, i) => {
    refusedWithOneLine(t, res, new RegExp(`^progressdb: CONFIG_INVALID: .*${cases[i]![1].source}`));
    t.false(existsSync(path.join(dataDir, 'master.key')), res.stderr);
    t.false(existsSync(path.join(dataDir, 'admin.key')), res.stderr);
  });
});
