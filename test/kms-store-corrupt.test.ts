/**
 * Corruption at rest told apart from a wrong master key: the key check value stored beside the
 * keyring, a flipped bit in a stored wrapped KEK, a DEK record that names a KEK version the registry
 * does not hold, and registries written before key check values existed.
 */
import path from 'node:path';
import test from 'ava';
import { open, type RootDatabase } from 'lmdb';
import { createKms } from '../src/kms/index.js';
import type { DekRecord, KekRecord } from '../src/kms/registry/index.js';
import { expectCode, openKms, randomKeyHex, writeMasterKey } from './helpers/kms.js';

/** Opens a closed KMS's registry directly, as an attacker or a failing disk would change it. */
function withRegistry<T>(dataDir: string, change: (root: RootDatabase) => T): T {
  const root = open({ path: path.join(dataDir, 'registry.mdb'), compression: false, maxDbs: 8 });
  try {
    return change(root);
  } finally {
    root.close();
  }
}

function flipKekBit(root: RootDatabase, version: number): void {
  const keks = root.openDB<KekRecord, number>({ name: 'keks' });
  const kek = keks.get(version)!;
  const wrapped = Buffer.from(kek.wrapped);
  wrapped[wrapped.length - 5]! ^= 0x01;
  keks.putSync(version, { ...kek, wrapped });
}

test('a flipped bit in the stored wrapped KEK is STORE_CORRUPT; a wrong master key still MASTER_KEY_MISMATCH', async (t) => {
  const fixture = await openKms(t);
  await fixture.kms.createDekForThread('thread-kcv');
  await fixture.kms.close();
  withRegistry(fixture.dataDir, (root) => flipKekBit(root, 1));

  const err = await expectCode(t, fixture.reopen(), 'STORE_CORRUPT');
  t.regex(err?.message ?? '', /KEK version 1/);
  // The key check value decides first: a wrong key is reported as such, corrupt KEK or not.
  const wrong = writeMasterKey(fixture.dir, randomKeyHex(), 'wrong.key');
  await expectCode(
    t,
    createKms({ dataDir: fixture.dataDir, masterKeyFile: wrong.file, poolSize: 1 }),
    'MASTER_KEY_MISMATCH',
  );
});

test('a DEK record naming a KEK version the registry does not hold is STORE_CORRUPT on use, naming the key', async (t) => {
  const fixture = await openKms(t);
  const dek = await fixture.kms.createDekForThread('thread-bogus-kek');
  const other = await fixture.kms.createDekForThread('thread-fine');
  const { ciphertext } = await fixture.kms.encrypt(dek.keyId, Buffer.from('hello'));
  const fine = await fixture.kms.encrypt(other.keyId, Buffer.from('still fine'));
  await fixture.kms.close();
  withRegistry(fixture.dataDir, (root) => {
    const deks = root.openDB<DekRecord, string>({ name: 'deks' });
    const record = deks.get(dek.keyId)!;
    deks.putSync(dek.keyId, { ...record, versions: record.versions.map((v) => ({ ...v, kek: 99 })) });
  });

  const kms = await fixture.reopen();
  const err = await expectCode(t, kms.decrypt(dek.keyId, ciphertext), 'STORE_CORRUPT');
  t.true(err?.message.includes(dek.keyId), 'the message names the key');
  await expectCode(t, kms.encrypt(dek.keyId, Buffer.from('more')), 'STORE_CORRUPT');
  t.deepEqual(await kms.decrypt(other.keyId, fine.ciphertext), Buffer.from('still fine'));
});

test('a registry without a key check value gets one at its first proven start', async (t) => {
  const fixture = await openKms(t);
  await fixture.kms.close();
  const kcvOf = (root: RootDatabase) => root.openDB<Uint8Array, string>({ name: 'meta' }).get('kcv');
  const stored = withRegistry(fixture.dataDir, (root) => {
    const kcv = kcvOf(root);
    root.openDB({ name: 'meta' }).removeSync('kcv');
    return kcv === undefined ? undefined : Buffer.from(kcv);
  });
  t.is(stored?.length, 16, 'a new registry holds a 16-byte key check value');

  // Without a KCV, a KEK that fails to unwrap cannot be told from a wrong key: as before.
  withRegistry(fixture.dataDir, (root) => flipKekBit(root, 1));
  await expectCode(t, fixture.reopen(), 'MASTER_KEY_MISMATCH');
  t.is(withRegistry(fixture.dataDir, kcvOf), undefined, 'a failed start stores nothing');
  withRegistry(fixture.dataDir, (root) => flipKekBit(root, 1));

  const kms = await fixture.reopen();
  await kms.close();
  t.deepEqual(Buffer.from(withRegistry(fixture.dataDir, kcvOf)!), stored, 'the same KCV is stored again');
  withRegistry(fixture.dataDir, (root) => flipKekBit(root, 1));
  await expectCode(t, fixture.reopen(), 'STORE_CORRUPT');
});
