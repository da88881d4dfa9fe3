/**
 * Mixed formats: a store written by the AES-256-GCM-only code (format 1, the fixture in
 * test/fixtures/store-format-1, made by its make.mts) opens under today's code, every old ciphertext
 * decrypts, new data is written in the configured cipher, and a KEK rotation rewraps every DEK
 * into it, with the old ciphertexts still readable and the audit chain unbroken.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';
import { FORMAT_AES_256_GCM, FORMAT_XCHACHA20_POLY1305 } from '../src/format.js';
import { createKms } from '../src/kms/index.js';
import { tempDir } from './helpers/kms.js';

const FIXTURE = fileURLToPath(new URL('./fixtures/store-format-1', import.meta.url));

interface Sample {
  keyId: string;
  plaintext: string;
  aad: string;
  ciphertext: string;
}

const samples = JSON.parse(fs.readFileSync(path.join(FIXTURE, 'ciphertexts.json'), 'utf8')) as Sample[];

/** A private copy of the fixture (opening a store writes to it), with the key file made 0600. */
function copyFixture(t: Parameters<typeof tempDir>[0]): { dataDir: string; masterKeyFile: string } {
  const dir = tempDir(t);
  fs.cpSync(FIXTURE, dir, { recursive: true });
  const masterKeyFile = path.join(dir, 'master.key');
  fs.chmodSync(masterKeyFile, 0o600);
  return { dataDir: path.join(dir, 'kms'), masterKeyFile };
}

async function decryptsAll(t: Parameters<typeof tempDir>[0], kms: Awaited<ReturnType<typeof createKms>>) {
  for (const s of samples) {
    const plain = await kms.decrypt(s.keyId, Buffer.from(s.ciphertext, 'base64'), Buffer.from(s.aad));
    t.is(plain.toString(), s.plaintext);
  }
}

test('a format-1 store opens, decrypts, writes format 2, and rotates every DEK into format 2', async (t) => {
  const kms = await createKms({ ...copyFixture(t), poolSize: 1 });
  t.teardown(() => kms.close());
  t.true(
    samples.every((s) => Buffer.from(s.ciphertext, 'base64')[0] === FORMAT_AES_256_GCM),
    'the fixture is format 1',
  );
  const keyIds = [...new Set(samples.map((s) => s.keyId))];
  for (const keyId of keyIds) t.is((await kms.getWrappedDek(keyId)).wrapped[0], FORMAT_AES_256_GCM);
  await decryptsAll(t, kms);

  const [first] = samples as [Sample];
  const fresh = await kms.encrypt(first.keyId, Buffer.from('new message'), Buffer.from('t/new'));
  t.is(fresh.ciphertext[0], FORMAT_XCHACHA20_POLY1305);
  const moved = await kms.reencrypt(
    first.keyId,
    Buffer.from(first.ciphertext, 'base64'),
    Buffer.from(first.aad),
  );
  t.is(moved.ciphertext[0], FORMAT_XCHACHA20_POLY1305, 'reencrypt moves old data to the configured format');
  t.is(
    (await kms.decrypt(first.keyId, moved.ciphertext, Buffer.from(first.aad))).toString(),
    first.plaintext,
  );
  const created = await kms.createDekForThread('t-new');
  t.is(created.wrapped[0], FORMAT_XCHACHA20_POLY1305);

  const before = (await kms.health()).activeKekVersion;
  const rotation = await kms.rotateKek();
  t.is(rotation.state, 'completed');
  t.is((await kms.health()).activeKekVersion, before + 1);
  for (const keyId of [...keyIds, created.keyId]) {
    t.is((await kms.getWrappedDek(keyId)).wrapped[0], FORMAT_XCHACHA20_POLY1305, `${keyId} rewrapped`);
  }
  await decryptsAll(t, kms);
  t.is((await kms.decrypt(first.keyId, fresh.ciphertext, Buffer.from('t/new'))).toString(), 'new message');
  const audit = await kms.verifyAudit();
  t.true(audit.ok, JSON.stringify(audit));
});

test('with cipher aes-256-gcm the same store keeps writing format 1, and reads what format 2 wrote', async (t) => {
  const fixture = copyFixture(t);
  const xchacha = await createKms({ ...fixture, poolSize: 1 });
  const [first] = samples as [Sample];
  const written = await xchacha.encrypt(first.keyId, Buffer.from('from format 2'));
  await xchacha.close();

  const kms = await createKms({ ...fixture, poolSize: 1, cipher: 'aes-256-gcm' });
  t.teardown(() => kms.close());
  await decryptsAll(t, kms);
  t.is((await kms.decrypt(first.keyId, written.ciphertext)).toString(), 'from format 2');
  t.is((await kms.encrypt(first.keyId, Buffer.from('x'))).ciphertext[0], FORMAT_AES_256_GCM);
  t.is((await kms.createDekForThread('t-aes')).wrapped[0], FORMAT_AES_256_GCM);
  await kms.rotateKek();
  t.is((await kms.getWrappedDek(first.keyId)).wrapped[0], FORMAT_AES_256_GCM);
  await decryptsAll(t, kms);
});

test('an unknown cipher is CONFIG_INVALID, naming the choices', async (t) => {
  const err = await t.throwsAsync(createKms({ ...copyFixture(t), cipher: 'des' }));
  t.is((err as { code?: string }).code, 'CONFIG_INVALID');
  t.regex(err?.message ?? '', /xchacha20-poly1305, aes-256-gcm/);
});
