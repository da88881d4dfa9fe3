/**
 * Worker isolation: after creating keys, encrypting, decrypting and rotating, a V8 heap snapshot
 * of the main thread holds neither the master key nor any DEK (nor a KEK or derived root key).
 *
 * V8 heap snapshots do not include ArrayBuffer contents, so raw key bytes in a Buffer would not
 * show up here whatever the code did; what they do capture is every string, and strings are how
 * keys usually leak (hex or base64 for logging, JSON, config parsing, error messages). The check
 * also looks for each key's bytes as a latin1 string.
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { open } from 'lmdb';
import { SIGNING_KEY_FILE_LABEL } from '../src/audit-checkpoint.js';
import { dekIdentity, kekIdentity, WRAP_KIND_DEK, WRAP_KIND_KEK } from '../src/format.js';
import { generateAuditSigningKey } from '../src/kms/keygen.js';
import type { DekRecord, KekRecord } from '../src/kms/registry/index.js';
import { openInto } from '../workers/aead.js';
import { loadRootKeys } from '../workers/master-key.js';
import { runChild, tempDir, unwrapKey, writeMasterKey, writeScript } from './helpers/kms.js';

const CHILD = `import fs from 'node:fs';
import v8 from 'node:v8';
import { createKms } from 'KMS_MODULE';
const [dataDir, keyFile, snapshot, out, signingKeyFile] = process.argv.slice(2);
const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2, auditSigningKeyFile: signingKeyFile, auditCheckpointLines: 10 });
const samples = [];
for (let i = 0; i < 20; i++) {
  const dek = await kms.createDekForThread('thread-' + i);
  if (i % 5 === 0) await kms.rotateDek(dek.keyId);
  const plaintext = 'heap sample ' + i;
  const { ciphertext, keyVersion } = await kms.encrypt(dek.keyId, Buffer.from(plaintext), Buffer.from('aad-' + i));
  if ((await kms.decrypt(dek.keyId, ciphertext, Buffer.from('aad-' + i))).toString() !== plaintext) throw new Error('round trip');
  await kms.getWrappedDek(dek.keyId);
  samples.push({ keyId: dek.keyId, keyVersion, ciphertext: ciphertext.toString('base64'), aad: 'aad-' + i, plaintext });
}
await kms.encryptBatch(samples.map((s) => ({ keyId: s.keyId, plaintext: Buffer.from(s.plaintext) })));
await kms.rotateKek();
await kms.rewrapDek(samples[0].keyId);
await kms.verifyAudit();
v8.writeHeapSnapshot(snapshot);
await kms.close();
fs.writeFileSync(out, JSON.stringify(samples));
`;

interface Sample {
  keyId: string;
  keyVersion: number;
  ciphertext: string;
  aad: string;
  plaintext: string;
}

/** The ways a 32-byte key usually turns into a string. */
function encodings(key: Buffer): string[] {
  return [
    key.toString('hex'),
    key.toString('hex').toUpperCase(),
    key.toString('base64'),
    key.toString('base64url'),
    key.toString('latin1'),
  ];
}

test('a heap snapshot of the main thread contains no master key, KEK, DEK or audit signing key', async (t) => {
  const dir = tempDir(t);
  const { file: keyFile, hex } = writeMasterKey(dir);
  const signingKeyFile = path.join(dir, 'audit-signing.key');
  await generateAuditSigningKey(signingKeyFile);
  const dataDir = path.join(dir, 'kms');
  const snapshot = path.join(dir, 'main.heapsnapshot');
  const samplesFile = path.join(dir, 'samples.json');
  await runChild(t, writeScript(dir, 'heap', CHILD), [
    dataDir,
    keyFile,
    snapshot,
    samplesFile,
    signingKeyFile,
  ]);
  t.true(
    fs.readFileSync(path.join(dataDir, 'kms-audit.log'), 'utf8').includes('"op":"checkpoint"'),
    'the workers signed checkpoints',
  );
  const samples = JSON.parse(fs.readFileSync(samplesFile, 'utf8')) as Sample[];

  // Derive every key the child's workers held, from the registry and the master key, exactly
  // as the workers do (HKDF root keys, then AEAD unwrapping bound to each key's identity).
  const roots = loadRootKeys({ kind: 'file', path: keyFile });
  const db = open({
    path: path.join(dataDir, 'registry.mdb'),
    compression: false,
    maxDbs: 8,
    readOnly: true,
  });
  t.teardown(() => db.close());
  const keks = new Map<number, Buffer>();
  for (const { value } of db.openDB<KekRecord, number>({ name: 'keks' }).getRange({})) {
    keks.set(
      value.version,
      unwrapKey(roots.kekWrapKey, WRAP_KIND_KEK, 0, kekIdentity(value.kekId, value.version), value.wrapped),
    );
  }
  t.deepEqual([...keks.keys()], [2], 'only the rotated-to KEK version is stored');
  const deks = new Map<string, Buffer>();
  for (const { value } of db.openDB<DekRecord, string>({ name: 'deks' }).getRange({})) {
    for (const v of value.versions) {
      const kek = keks.get(v.kek)!;
      deks.set(
        `${value.keyId}#${v.v}`,
        unwrapKey(kek, WRAP_KIND_DEK, v.kek, dekIdentity(value.keyId, v.v), v.wrapped),
      );
    }
  }
  t.is(deks.size, 24, '20 keys, 4 of them with a second version');

  // The derived DEKs are the real ones: each opens its sample ciphertext.
  for (const s of samples) {
    const dek = deks.get(`${s.keyId}#${s.keyVersion}`);
    t.truthy(dek, s.keyId);
    const ciphertext = Buffer.from(s.ciphertext, 'base64');
    const out = Buffer.alloc(ciphertext.length);
    const length = openInto(dek!, ciphertext, Buffer.from(s.aad), out, 0);
    t.is(out.subarray(0, length).toString(), s.plaintext);
  }

  const heap = JSON.parse(fs.readFileSync(snapshot, 'utf8')) as { strings: string[] };
  t.true(heap.strings.length > 1000, 'a real snapshot');
  // Sanity check that the search sees what the main thread did hold: the key ids and the key file path.
  const all = heap.strings.join('\u0000');
  t.true(all.includes(samples[0]!.keyId));
  t.true(all.includes(keyFile));
  t.true(all.includes(signingKeyFile), 'the main thread holds the signing key file path');

  const master = Buffer.from(hex, 'hex');
  const needles = new Map<string, string>();
  for (const [i, s] of encodings(master).entries()) needles.set(`master key #${i}`, s);
  for (const [name, key] of [
    ['KEK-wrap key', roots.kekWrapKey],
    ['audit key', roots.auditKey],
  ] as const) {
    for (const [i, s] of encodings(key).entries()) needles.set(`${name} #${i}`, s);
  }
  // The signing key's seed: what its file holds after the label, and all that the secret key is made of.
  const seed = Buffer.from(
    fs.readFileSync(signingKeyFile, 'latin1').slice(SIGNING_KEY_FILE_LABEL.length).trim(),
    'hex',
  );
  t.is(seed.length, 32);
  for (const [i, s] of encodings(seed).entries()) needles.set(`audit signing key #${i}`, s);
  for (const [version, key] of keks)
    for (const [i, s] of encodings(key).entries()) needles.set(`KEK v${version} #${i}`, s);
  for (const [id, key] of deks)
    for (const [i, s] of encodings(key).entries()) needles.set(`DEK ${id} #${i}`, s);
  const found = [...needles].filter(([, needle]) => all.includes(needle)).map(([what]) => what);
  t.deepEqual(found, [], 'no key material in main-thread strings');
});
