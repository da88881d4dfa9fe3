/**
 * Crash safety of external mode: kill -9 the daemon in the middle of a KEK rotation over 20,000
 * DEKs, start it again on the same data directory and ports, and check that the rotation resumes
 * and completes and that every key still decrypts what it encrypted before the crash. Then a
 * graceful SIGTERM with requests in flight: exit 0, nothing hangs, the audit log verifies.
 */

import { writeFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import type { EncryptResult, Kms } from '../src/api/index.js';
import type { CodedError } from '../src/errors.js';
import { createRemoteKms } from '../src/remote/index.js';
import { type Daemon, keygen, spawnDaemon } from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';
import { KMS_CLI, runCli, tempDir } from './helpers/server.js';

const KEYS = 5000;

async function daemonWithSmallRotationBatches(dir: string, ports?: { http: number; bridge: number }) {
  return spawnDaemon({
    dir,
    httpPort: ports?.http ?? 0,
    bridgePort: ports?.bridge ?? 0,
    args: ['--config', path.join(dir, 'kms.yaml')],
  });
}

test.serial('kill -9 during a KEK rotation: restart resumes it and every key still decrypts', async (t) => {
  const dir = tempDir('pdb-kms-crash-');
  await keygen(dir);
  // Small rotation batches make the pass long enough to be caught half-way.
  writeFileSync(path.join(dir, 'kms.yaml'), 'kms:\n  rotation_batch_size: 100\n');
  let daemon: Daemon = await daemonWithSmallRotationBatches(dir);
  t.teardown(() => daemon.kill9());
  const ports = { http: daemon.httpPort, bridge: daemon.bridgePort! };
  const kms: Kms = createRemoteKms({ endpoint: `tcp://${daemon.bridge}` });
  t.teardown(() => kms.close());

  const deks = await Promise.all(
    Array.from({ length: KEYS }, (_, i) => kms.createDekForThread(`crash-${i}`)),
  );
  const plaintexts = deks.map((_, i) => Buffer.from(`message ${i}`));
  const encrypted = await kms.encryptBatch(
    deks.map((d, i) => ({ keyId: d.keyId, plaintext: plaintexts[i]! })),
  );
  const ciphertexts = encrypted.map((r) => (r as { value: EncryptResult }).value.ciphertext);
  t.is(ciphertexts.filter(Boolean).length, KEYS);

  const before = await kms.rotationStatus();
  await kms.startKekRotation();
  const midway = await until(
    'the rotation half-way',
    async () => {
      const s = await kms.rotationStatus();
      return s.state === 'running' && s.done > 0 && s.done < s.total ? s : undefined;
    },
    30_000,
  );
  await daemon.kill9();
  t.log(`killed at ${midway.done}/${midway.total}`);

  const down = await t.throwsAsync<CodedError>(kms.rotationStatus());
  t.is(down?.code, 'KMS_UNAVAILABLE');

  daemon = await daemonWithSmallRotationBatches(dir, ports);
  const done = await until(
    'the resumed rotation to complete',
    async () => {
      const s = await kms.rotationStatus().catch(() => undefined);
      return s?.state === 'completed' ? s : undefined;
    },
    60_000,
  );
  t.is(done.activeKekVersion, midway.targetKekVersion!);
  t.true(done.activeKekVersion > before.activeKekVersion);
  t.deepEqual(done.kekVersions, [done.activeKekVersion]);

  const decrypted = await kms.decryptBatch(
    deks.map((d, i) => ({ keyId: d.keyId, ciphertext: ciphertexts[i]! })),
  );
  const failures = decrypted.filter((r, i) => !(r.ok && r.value.equals(plaintexts[i]!)));
  t.is(failures.length, 0);
  const sample = await kms.getWrappedDek(deks[KEYS - 1]!.keyId);
  t.is(sample.kekVersion, done.activeKekVersion);
});

test.serial('SIGTERM drains in-flight requests, exits 0, and the audit log verifies', async (t) => {
  const dir = tempDir('pdb-kms-drain-');
  const masterKeyFile = await keygen(dir);
  const daemon = await spawnDaemon({ dir, bridgePort: 0 });
  t.teardown(() => daemon.kill9());
  const clients = [
    createRemoteKms({ endpoint: `tcp://${daemon.bridge}`, retries: 0 }),
    createRemoteKms({ endpoint: daemon.http, retries: 0 }),
  ];
  t.teardown(() => Promise.all(clients.map((c) => c.close())));
  const dek = await clients[0]!.createDekForThread('drain');
  const inFlight = clients.flatMap((c) =>
    Array.from({ length: 200 }, (_, i) => c.encrypt(dek.keyId, Buffer.from(`in flight ${i}`))),
  );
  // Signal as soon as the daemon has started answering this wave.
  const firstAnswer = Promise.race(inFlight);
  await firstAnswer;
  const exit = daemon.stop('SIGTERM');
  const outcomes = await Promise.allSettled(inFlight);
  const info = await exit;
  t.is(info.code, 0);
  t.true(daemon.logs.some((l) => l.includes('"msg":"stopped"')));
  const rejected = outcomes.filter((o) => o.status === 'rejected') as PromiseRejectedResult[];
  t.true(outcomes.length - rejected.length > 0);
  for (const r of rejected) t.is((r.reason as CodedError).code, 'KMS_UNAVAILABLE');

  const verify = await runCli(KMS_CLI, [
    'audit',
    'verify',
    '--data-dir',
    daemon.dataDir,
    '--master-key-file',
    masterKeyFile,
  ]);
  t.is(verify.code, 0, verify.stdout + verify.stderr);
  t.regex(verify.stdout, /^ok: \d+ lines verified/);
});
