/**
 * kill -9 during KEK rotation: every DEK stays decryptable at every instant, and the next start
 * (background resume) or call (rotateKek) finishes the rotation.
 */

import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import type { RotationStatus } from '../src/api/index.js';
import { type Child, openKms, runChild, startChild, writeScript } from './helpers/kms.js';
import { until } from './helpers/processes.js';

const DEKS = 10_000;
const SAMPLE_EVERY = 50;

interface Sample {
  keyId: string;
  ciphertext: string;
  aad: string;
  plaintext: string;
}

const SETUP = `import fs from 'node:fs';
import { createKms } from 'KMS_MODULE';
const [dataDir, keyFile, out, total, every] = process.argv.slice(2);
const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2 });
const samples = [];
const chunk = 1000;
for (let i = 0; i < Number(total); i += chunk) {
  const deks = await Promise.all(
    Array.from({ length: Math.min(chunk, Number(total) - i) }, (_, j) => kms.createDekForThread('thread-' + (i + j))),
  );
  await Promise.all(deks.map(async (dek, j) => {
    if ((i + j) % Number(every) !== 0) return;
    const plaintext = 'sample message ' + (i + j);
    const aad = 'thread-' + (i + j) + '/m1';
    const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from(plaintext), Buffer.from(aad));
    samples.push({ keyId: dek.keyId, ciphertext: ciphertext.toString('base64'), aad, plaintext });
  }));
}
await kms.close();
fs.writeFileSync(out, JSON.stringify(samples));
`;

/** Runs (or resumes) a rotation and prints its status every few ms until killed. */
const ROTATE = `import { createKms } from 'KMS_MODULE';
const [dataDir, keyFile, mode] = process.argv.slice(2);
const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2, rotationBatchSize: 200, resumeRotation: mode === 'resume' });
const print = async () => process.stdout.write(JSON.stringify(await kms.rotationStatus()) + '\\n');
if (mode === 'start') kms.rotateKek().catch((e) => process.stdout.write('error ' + e.code + '\\n'));
await print();
setInterval(print, 2);
`;

function statuses(child: Child): RotationStatus[] {
  return child
    .stdout()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as RotationStatus);
}

/**
 * Kills `child` with SIGKILL as soon as it reports a running rotation past `after` and not
 * finished. The reported count runs up to one batch ahead of what is committed (a batch's
 * rewraps are computed while the previous batch commits), hence margins of a few batches.
 */
async function killMidRotation(child: Child, after: number): Promise<RotationStatus> {
  const seen = await until(
    'the rotation to be part-way',
    () => {
      if (child.stdout().includes('error')) throw new Error(child.stdout());
      return statuses(child).find((s) => s.state === 'running' && s.done > after && s.done < s.total);
    },
    60_000,
  );
  child.kill('SIGKILL');
  const exit = await child.exited;
  if (exit.signal !== 'SIGKILL') throw new Error(`child exited on its own: ${exit.code} ${exit.stderr}`);
  return seen;
}

test('kill -9 during KEK rotation: every key decrypts before and after, and restarts finish it', async (t) => {
  const fixture = await openKms(t, { poolSize: 2 });
  await fixture.kms.close();
  const { dir, dataDir, keyFile } = fixture;
  const samplesFile = path.join(dir, 'samples.json');
  await runChild(t, writeScript(dir, 'setup', SETUP), [
    dataDir,
    keyFile,
    samplesFile,
    String(DEKS),
    String(SAMPLE_EVERY),
  ]);
  const samples = JSON.parse(fs.readFileSync(samplesFile, 'utf8')) as Sample[];
  t.is(samples.length, DEKS / SAMPLE_EVERY);
  const rotate = writeScript(dir, 'rotate', ROTATE);

  const checkSamples = async (kms: Awaited<ReturnType<typeof fixture.reopen>>, when: string) => {
    const results = await kms.decryptBatch(
      samples.map((s) => ({
        keyId: s.keyId,
        ciphertext: Buffer.from(s.ciphertext, 'base64'),
        aad: Buffer.from(s.aad),
      })),
    );
    const bad = results.flatMap((r, i) => (r.ok && r.value.toString() === samples[i]!.plaintext ? [] : [i]));
    t.deepEqual(bad, [], `every sample decrypts ${when}`);
  };

  // 1. Start a rotation in a child and kill -9 it part-way.
  const first = await killMidRotation(startChild(t, rotate, [dataDir, keyFile, 'start']), 1000);
  t.is(first.total, DEKS);
  let kms = await fixture.reopen({ resumeRotation: false, poolSize: 2 });
  const interrupted = await kms.rotationStatus();
  t.like(interrupted, { state: 'running', activeKekVersion: 2, targetKekVersion: 2, kekVersions: [1, 2] });
  t.true(
    interrupted.done >= first.done - 400 && interrupted.done < interrupted.total,
    `progress ${interrupted.done}`,
  );
  const kekOf = await Promise.all(samples.map(async (s) => (await kms.getWrappedDek(s.keyId)).kekVersion));
  t.true(kekOf.includes(1) && kekOf.includes(2), 'some keys rewrapped, some not yet');
  await checkSamples(kms, 'right after the first kill');
  t.true((await kms.verifyAudit()).ok, 'the audit log survives kill -9');
  await kms.close();

  // 2. A restart resumes it in the background; kill -9 that one part-way too.
  const second = await killMidRotation(
    startChild(t, rotate, [dataDir, keyFile, 'resume']),
    interrupted.done + 1000,
  );
  t.is(second.targetKekVersion, 2, 'resumed the same rotation');
  kms = await fixture.reopen({ resumeRotation: false, poolSize: 2 });
  const interruptedAgain = await kms.rotationStatus();
  t.like(interruptedAgain, { state: 'running', targetKekVersion: 2, kekVersions: [1, 2] });
  t.true(interruptedAgain.done > interrupted.done, 'the resumed pass made progress');
  await checkSamples(kms, 'right after the second kill');
  await kms.close();

  // 3. Restart normally: the background resume finishes the rotation.
  kms = await fixture.reopen({ poolSize: 2 });
  const finished = await until(
    'the resumed rotation to complete',
    async () => {
      const s = await kms.rotationStatus();
      return s.state === 'completed' ? s : undefined;
    },
    60_000,
  );
  t.like(finished, { activeKekVersion: 2, targetKekVersion: 2, kekVersions: [2], done: DEKS, total: DEKS });
  await checkSamples(kms, 'after the resumed rotation');
  const after = await Promise.all(samples.map(async (s) => (await kms.getWrappedDek(s.keyId)).kekVersion));
  t.deepEqual([...new Set(after)], [2]);

  // 4. And the KMS rotates normally afterwards.
  t.like(await kms.rotateKek(), { state: 'completed', activeKekVersion: 3, kekVersions: [3] });
  await checkSamples(kms, 'after another rotation');
  t.true((await kms.verifyAudit()).ok);
});

test('an interrupted rotation is finished by rotateKek() when background resume is off', async (t) => {
  const fixture = await openKms(t, { poolSize: 2 });
  await fixture.kms.close();
  const { dir, dataDir, keyFile } = fixture;
  const samplesFile = path.join(dir, 'samples.json');
  await runChild(t, writeScript(dir, 'setup', SETUP), [dataDir, keyFile, samplesFile, '5000', '50']);
  const samples = JSON.parse(fs.readFileSync(samplesFile, 'utf8')) as Sample[];
  const rotate = writeScript(dir, 'rotate', ROTATE);
  const killedAt = await killMidRotation(startChild(t, rotate, [dataDir, keyFile, 'start']), 0);

  const kms = await fixture.reopen({ resumeRotation: false, poolSize: 2 });
  t.like(await kms.rotationStatus(), { state: 'running', targetKekVersion: 2 });
  const status = await kms.rotateKek();
  t.like(status, {
    state: 'completed',
    activeKekVersion: 2,
    targetKekVersion: 2,
    kekVersions: [2],
    total: 5000,
  });
  t.true(status.done >= killedAt.done);
  for (const s of samples) {
    t.is(
      (await kms.decrypt(s.keyId, Buffer.from(s.ciphertext, 'base64'), Buffer.from(s.aad))).toString(),
      s.plaintext,
    );
  }
});
