/**
 * Reaching a protected etcd: etcds:// with a CA and a client certificate, and etcd's own user
 * authentication with a password file. Real single-member etcds started here with those settings,
 * real replicas; each wrong credential is refused at start with one line and exit code 1.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { Etcd3, Range } from 'etcd3';
import type { Kms } from '../src/api/index.js';
import { createRemoteKms } from '../src/remote/index.js';
import { ETCD_BINARY } from './helpers/etcd.js';
import { tempDir } from './helpers/kms.js';
import { type Daemon, daemonRefuses, keygen, makePki, type Pki, spawnDaemon } from './helpers/kms-daemon.js';
import { freePort, until } from './helpers/processes.js';
import { tempDir as scratchDir } from './helpers/server.js';

const members: { child: ChildProcess; dir: string }[] = [];
const clients: Kms[] = [];
let pki: Pki;
let keyDir: string;

/**
 * One etcd member on free loopback ports with extra flags (TLS, client certificates), and an
 * admin client of it (`credentials` for TLS), returned once it answers that client.
 */
async function startEtcd(
  t: ExecutionContext,
  scheme: 'http' | 'https',
  extra: string[],
  credentials?: { rootCertificate: Buffer; certChain: Buffer; privateKey: Buffer },
): Promise<{ clientUrl: string; admin: Etcd3 }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'etcd-test-auth-'));
  const clientUrl = `${scheme}://127.0.0.1:${await freePort()}`;
  const peerUrl = `http://127.0.0.1:${await freePort()}`;
  const child = spawn(
    ETCD_BINARY,
    [
      '--name=m0',
      `--data-dir=${path.join(dir, 'data')}`,
      `--listen-client-urls=${clientUrl}`,
      `--advertise-client-urls=${clientUrl}`,
      `--listen-peer-urls=${peerUrl}`,
      `--initial-advertise-peer-urls=${peerUrl}`,
      `--initial-cluster=m0=${peerUrl}`,
      '--logger=zap',
      '--log-level=error',
      ...extra,
    ],
    { stdio: 'ignore' },
  );
  members.push({ child, dir });
  const admin = new Etcd3({ hosts: clientUrl, ...(credentials && { credentials }) });
  t.teardown(() => admin.close());
  await until(
    'etcd answers',
    async () =>
      (await admin.get('probe').then(
        () => true,
        () => false,
      )) || undefined,
    20_000,
  );
  return { clientUrl, admin };
}

test.before(async () => {
  pki = makePki();
  keyDir = scratchDir('pdb-etcd-auth-key-');
  await keygen(keyDir);
});

test.after.always(async () => {
  await Promise.all(clients.map((c) => c.close()));
  for (const m of members) {
    m.child.kill('SIGKILL');
    fs.rmSync(m.dir, { recursive: true, force: true });
  }
});

/** A replica of `cluster` on `registry` with the shared master key and these extra flags. */
async function replica(t: ExecutionContext, registry: string, args: string[]): Promise<Daemon> {
  const dir = tempDir(t, 'pdb-etcd-auth-');
  fs.copyFileSync(path.join(keyDir, 'master.key'), path.join(dir, 'master.key'));
  fs.chmodSync(path.join(dir, 'master.key'), 0o600);
  const daemon = await spawnDaemon({ dir, args: ['--registry', registry, ...args] });
  t.teardown(() => daemon.kill9());
  return daemon;
}

function refuses(registry: string, args: string[]) {
  return daemonRefuses([
    '--listen',
    '127.0.0.1:0',
    '--data-dir',
    path.join(scratchDir('pdb-etcd-auth-refused-'), 'kms'),
    '--master-key-file',
    path.join(keyDir, 'master.key'),
    '--registry',
    registry,
    ...args,
  ]);
}

async function roundTrip(t: ExecutionContext, daemon: Daemon, threadId: string): Promise<Kms> {
  const kms = createRemoteKms({ endpoint: `http://${daemon.http}` });
  clients.push(kms);
  const { keyId } = await kms.createDekForThread(threadId);
  const { ciphertext } = await kms.encrypt(keyId, Buffer.from(threadId));
  t.is((await kms.decrypt(keyId, ciphertext)).toString(), threadId);
  return kms;
}

test('etcds:// with a CA and a client certificate: serves; no certificate or a foreign one is refused at start', async (t) => {
  const { files } = pki;
  const clientCert = path.join(pki.dir, 'client.crt');
  const clientKey = path.join(pki.dir, 'client.key');
  const { clientUrl, admin } = await startEtcd(
    t,
    'https',
    [
      `--cert-file=${files.serverCert}`,
      `--key-file=${files.serverKey}`,
      `--trusted-ca-file=${files.caCert}`,
      '--client-cert-auth',
    ],
    {
      rootCertificate: fs.readFileSync(files.caCert),
      certChain: fs.readFileSync(clientCert),
      privateKey: fs.readFileSync(clientKey),
    },
  );
  const registry = `etcds://${new URL(clientUrl).host}`;
  const tls = ['--etcd-ca-file', files.caCert, '--etcd-cert-file', clientCert, '--etcd-key-file', clientKey];

  const daemon = await replica(t, registry, ['--cluster', 'tls', ...tls]);
  await roundTrip(t, daemon, 'over-tls');
  t.true(
    (await admin.getAll().prefix('/progressdb-kms/tls/').keys()).length > 0,
    'the replica wrote through TLS',
  );

  const cases: [string[], RegExp][] = [
    [['--cluster', 'tls', '--etcd-ca-file', files.caCert], /REGISTRY_UNAVAILABLE/],
    [
      [
        '--cluster',
        'tls',
        '--etcd-ca-file',
        files.caCert,
        '--etcd-cert-file',
        path.join(pki.dir, 'rogue.crt'),
        '--etcd-key-file',
        path.join(pki.dir, 'rogue.key'),
      ],
      /REGISTRY_UNAVAILABLE/,
    ],
    [['--cluster', 'tls'], /REGISTRY_UNAVAILABLE/],
  ];
  const results = await Promise.all(cases.map(([args]) => refuses(registry, args)));
  for (const [i, res] of results.entries()) {
    t.is(res.code, 1, `case ${i}: ${res.stderr}`);
    t.regex(res.stderr, (cases[i] as [string[], RegExp])[1]);
    t.notRegex(res.stderr, /\n\s+at /);
  }
});

test('etcd user authentication from a password file: serves; a wrong password is refused; and the rotation compacts etcd history with the user rights', async (t) => {
  const { clientUrl, admin } = await startEtcd(t, 'http', []);
  // etcd's auth needs a root user; the KMS user may use only its cluster's prefix.
  await admin.user('root').create('root-password');
  await admin.user('root').addRole('root');
  await admin.role('kms').create();
  await admin.role('kms').grant({ permission: 'Readwrite', range: Range.prefix('/progressdb-kms/authz/') });
  await admin.user('kms').create('kms-password');
  await admin.user('kms').addRole('kms');
  await admin.auth.authEnable();

  const dir = tempDir(t, 'pdb-etcd-pw-');
  const good = path.join(dir, 'etcd.pw');
  const bad = path.join(dir, 'wrong.pw');
  fs.writeFileSync(good, 'kms-password\n', { mode: 0o600 });
  fs.writeFileSync(bad, 'not-the-password\n', { mode: 0o600 });
  const registry = `etcd://${new URL(clientUrl).host}`;
  const auth = (file: string) => ['--cluster', 'authz', '--etcd-user', 'kms', '--etcd-password-file', file];

  const daemon = await replica(t, registry, auth(good));
  const kms = await roundTrip(t, daemon, 'with-a-password');
  // etcd 3.4 lets a user without the root role compact: the rotation's audit line says it did.
  const status = await kms.rotateKek();
  t.is(status.state, 'completed');
  const completion = await until(
    'the completion is audited',
    async () =>
      /"detail":"complete:[^"]*"/.exec(
        fs.readFileSync(path.join(daemon.dataDir, 'kms-audit.log'), 'utf8'),
      )?.[0],
    20_000,
  );
  t.regex(completion, /history compacted to revision \d+/);

  const refusals = await Promise.all(
    [
      auth(bad),
      ['--cluster', 'authz'],
      ['--cluster', 'other', '--etcd-user', 'kms', '--etcd-password-file', good],
    ].map((args) => refuses(registry, args)),
  );
  for (const res of refusals) {
    t.is(res.code, 1, res.stderr);
    t.regex(res.stderr, /^progressdb-kms: REGISTRY_UNAVAILABLE: .+\n$/);
    t.log(res.stderr.trim());
  }
});
