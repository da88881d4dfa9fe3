/**
 * Who may call the daemon: bearer tokens (good, bad, missing) and mutual TLS (good, wrong and no
 * client certificate) on both listeners, the caller recorded in the audit log, and the start-up
 * refusals (exposed listener without protection, bad configuration) as one-line errors.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import type { CodedError } from '../src/errors.js';
import { createRemoteKms } from '../src/remote/index.js';
import {
  b64,
  type Daemon,
  daemonRefuses,
  keygen,
  makePki,
  type Pki,
  postJson,
  request,
  spawnDaemon,
} from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';
import { tempDir } from './helpers/server.js';

const APP_TOKEN = 'app-token-0123456789abcdef';
const OPS_TOKEN = 'ops-token-from-a-file-0123456789';

let tokenDaemon: Daemon;
let tlsDaemon: Daemon;
let pki: Pki;

test.before(async () => {
  const dir = tempDir('pdb-kms-auth-');
  await keygen(dir);
  writeFileSync(path.join(dir, 'ops.token'), `${OPS_TOKEN}\n`);
  writeFileSync(
    path.join(dir, 'kms.yaml'),
    [
      'tokens:',
      `  - name: app-server`,
      `    token: ${APP_TOKEN}`,
      '  - name: operator',
      '    token_file: ops.token',
    ].join('\n'),
  );
  pki = makePki();
  [tokenDaemon, tlsDaemon] = await Promise.all([
    spawnDaemon({ dir, bridgePort: 0, args: ['--config', path.join(dir, 'kms.yaml')] }),
    spawnDaemon({
      bridgePort: 0,
      args: [
        '--tls-cert',
        pki.files.serverCert,
        '--tls-key',
        pki.files.serverKey,
        '--tls-ca',
        pki.files.caCert,
      ],
    }),
  ]);
});

test.after.always(async () => {
  await Promise.all([tokenDaemon?.kill9(), tlsDaemon?.kill9()]);
});

const auditOf = (d: Daemon) => readFileSync(path.join(d.dataDir, 'kms-audit.log'), 'utf8');

test('listeners announce their auth mode', (t) => {
  t.deepEqual(
    tokenDaemon.listeners().map((l) => [l.listener, l.tls, l.auth]),
    [
      ['http', 'off', 'token'],
      ['bridge', 'off', 'token'],
    ],
  );
  t.deepEqual(
    tlsDaemon.listeners().map((l) => [l.listener, l.tls, l.auth]),
    [
      ['http', 'mutual', 'mtls'],
      ['bridge', 'mutual', 'mtls'],
    ],
  );
});

test('HTTP tokens: missing is 401, wrong is 403, good is 200; probes need none', async (t) => {
  const base = `http://${tokenDaemon.http}`;
  const body = { thread_id: 'token-thread' };
  const missing = await postJson(base, '/create_dek_for_thread', body);
  t.is(missing.status, 401);
  t.is(missing.json.error.code, 'UNAUTHENTICATED');
  t.is(missing.headers['www-authenticate'], 'Bearer');
  for (const header of [`Bearer ${APP_TOKEN}x`, 'Bearer short', `Basic ${b64(APP_TOKEN)}`, 'Bearer']) {
    const wrong = await postJson(base, '/create_dek_for_thread', body, {
      headers: { authorization: header },
    });
    t.is(wrong.status, 403, header);
    t.is(wrong.json.error.code, 'FORBIDDEN');
  }
  const good = await postJson(base, '/create_dek_for_thread', body, {
    headers: { authorization: `Bearer ${APP_TOKEN}` },
  });
  t.is(good.status, 200);
  const fromFile = await request(base, '/rotate_kek', { headers: { authorization: `bearer ${OPS_TOKEN}` } });
  t.is(fromFile.status, 200);
  t.is((await request(base, '/healthz')).status, 200);
  t.is((await request(base, '/metrics')).status, 200);
  t.is((await request(base, '/health')).status, 401);
  // The audit line names the token, never the token itself.
  const audit = await until('audit line', () =>
    auditOf(tokenDaemon).includes('"caller":"app-server"') ? 1 : undefined,
  );
  t.truthy(audit);
  t.false(auditOf(tokenDaemon).includes(APP_TOKEN));
  t.false(tokenDaemon.logs.join('\n').includes(APP_TOKEN));
});

for (const transport of ['http', 'tcp'] as const) {
  test(`remote client (${transport}) with a good, wrong and missing token`, async (t) => {
    const endpoint = transport === 'tcp' ? `tcp://${tokenDaemon.bridge}` : tokenDaemon.http;
    const good = createRemoteKms({ endpoint, token: OPS_TOKEN });
    const wrong = createRemoteKms({ endpoint, token: `${OPS_TOKEN}-not` });
    const none = createRemoteKms({ endpoint });
    t.teardown(() => Promise.all([good.close(), wrong.close(), none.close()]));
    const dek = await good.createDekForThread(`remote-token-${transport}`);
    const ct = await good.encrypt(dek.keyId, Buffer.from('hi'));
    t.is((await good.decrypt(dek.keyId, ct.ciphertext)).toString(), 'hi');
    const w = await t.throwsAsync<CodedError>(wrong.getWrappedDek(dek.keyId));
    t.is(w?.code, 'FORBIDDEN');
    t.is(w?.status, 403);
    const n = await t.throwsAsync<CodedError>(none.getWrappedDek(dek.keyId));
    t.is(n?.code, 'UNAUTHENTICATED');
    t.is(n?.status, 401);
    await until('operator audit line', () =>
      auditOf(tokenDaemon).includes('"caller":"operator"') ? 1 : undefined,
    );
  });
}

test('mTLS over HTTPS: a good client certificate works; a wrong one or none is refused', async (t) => {
  const base = `https://127.0.0.1:${tlsDaemon.httpPort}`;
  const good = await postJson(
    base,
    '/create_dek_for_thread',
    { thread_id: 'mtls-thread' },
    { tls: { ca: pki.caCert, cert: pki.clientCert, key: pki.clientKey } },
  );
  t.is(good.status, 200);
  const rogue = await request(base, '/get_wrapped?key_id=k', {
    tls: { ca: pki.caCert, cert: pki.rogueCert, key: pki.rogueKey },
  });
  t.is(rogue.status, 403);
  t.is(rogue.json.error.code, 'FORBIDDEN');
  const none = await request(base, '/healthz', { tls: { ca: pki.caCert } });
  t.is(none.status, 401);
  t.is(none.json.error.code, 'UNAUTHENTICATED');
  // Without trusting the daemon's CA, the client refuses the daemon.
  await t.throwsAsync(request(base, '/healthz', { tls: { cert: pki.clientCert, key: pki.clientKey } }));
  // The audit caller is the certificate subject.
  await until('CN audit line', () =>
    auditOf(tlsDaemon).includes('"caller":"app-server-1"') ? 1 : undefined,
  );
  t.pass();
});

for (const transport of ['http', 'tcp'] as const) {
  test(`remote client (${transport}) over mTLS: good cert, wrong cert, no cert`, async (t) => {
    const endpoint = transport === 'tcp' ? `tcp://${tlsDaemon.bridge}` : `https://${tlsDaemon.http}`;
    const good = createRemoteKms({
      endpoint,
      tls: { ca: pki.caCert, cert: pki.clientCert, key: pki.clientKey },
    });
    const rogue = createRemoteKms({
      endpoint,
      tls: { ca: pki.caCert, cert: pki.rogueCert, key: pki.rogueKey },
    });
    const none = createRemoteKms({ endpoint, tls: { ca: pki.caCert } });
    t.teardown(() => Promise.all([good.close(), rogue.close(), none.close()]));
    const dek = await good.createDekForThread(`mtls-${transport}`);
    const ct = await good.encrypt(dek.keyId, Buffer.from('over tls'), Buffer.from('aad'));
    t.is((await good.decrypt(dek.keyId, ct.ciphertext, Buffer.from('aad'))).toString(), 'over tls');
    const r = await t.throwsAsync<CodedError>(rogue.getWrappedDek(dek.keyId));
    t.is(r?.code, 'FORBIDDEN');
    const n = await t.throwsAsync<CodedError>(none.getWrappedDek(dek.keyId));
    t.is(n?.code, 'UNAUTHENTICATED');
  });
}

/** One line on stderr, exit code 1, no stack trace. */
function refusedCleanly(
  t: { is: (a: unknown, b: unknown, m?: string) => void },
  res: { code: number | null; stderr: string },
) {
  t.is(res.code, 1, res.stderr);
  t.is(res.stderr.trim().split('\n').length, 1, res.stderr);
  t.is(/\n\s+at /.test(res.stderr), false);
}

test('a non-loopback listener without TLS or tokens is refused unless --insecure', async (t) => {
  const dir = tempDir('pdb-kms-exposed-');
  const key = await keygen(dir);
  const common = ['--data-dir', path.join(dir, 'kms'), '--master-key-file', key];
  const [refused, bridgeRefused] = await Promise.all([
    daemonRefuses(['--listen', '0.0.0.0:0', ...common]),
    daemonRefuses(['--bridge-endpoint', '0.0.0.0:0', ...common]),
  ]);
  refusedCleanly(t, refused);
  t.regex(refused.stderr, /refusing to listen on non-loopback/);
  refusedCleanly(t, bridgeRefused);

  const exposed = await spawnDaemon({ dir, args: ['--listen', '0.0.0.0:0', '--insecure'] });
  t.teardown(() => exposed.kill9());
  t.true(exposed.logs.some((l) => l.includes('INSECURE')));
});

test('bad configuration exits 1 with one clear line', async (t) => {
  const dir = tempDir('pdb-kms-badcfg-');
  const key = await keygen(dir);
  const common = ['--data-dir', path.join(dir, 'kms'), '--master-key-file', key];
  const write = (name: string, text: string) => {
    const file = path.join(dir, name);
    writeFileSync(file, text);
    return file;
  };
  const cases: [string[], RegExp][] = [
    [['--config', write('typo.yaml', 'endpont: 127.0.0.1:1\n'), ...common], /endpont|unrecognized/i],
    [['--config', write('bad.yaml', 'tokens: [{name: a, token: short}]\n'), ...common], /at least 16/],
    [['--config', write('broken.json', '{"tokens": []'), ...common], /not valid YAML or JSON: line 1:/],
    [['--config', path.join(dir, 'missing.yaml'), ...common], /cannot read config file/],
    [['--tls-cert', key, ...common], /both a certificate file and a key file/],
    [['--tls-cert', key, '--tls-key', key, ...common], /TLS certificate, key or CA cannot be used/],
    [['--listen', 'ftp://x:1', ...common], /unsupported scheme/],
    [['--max-body-bytes', '12', ...common], /--max-body-bytes/],
    [['--data-dir', path.join(dir, 'kms'), '--master-key-file', path.join(dir, 'nokey')], /.+/],
  ];
  const results = await Promise.all(
    cases.map(([args]) => daemonRefuses(['--listen', '127.0.0.1:0', ...args])),
  );
  results.forEach((res, i) => {
    refusedCleanly(t, res);
    t.regex(res.stderr, cases[i]![1]);
  });
});

test('a port already in use is a clear start-up error', async (t) => {
  const busy = await spawnDaemon();
  t.teardown(() => busy.kill9());
  const dir = tempDir('pdb-kms-busy-');
  const key = await keygen(dir);
  const res = await daemonRefuses([
    '--listen',
    busy.http,
    '--data-dir',
    path.join(dir, 'kms'),
    '--master-key-file',
    key,
  ]);
  refusedCleanly(t, res);
  t.regex(res.stderr, /EADDRINUSE/);
});
