/**
 * The registry store interface: the shared conformance suite on LmdbStore, and what is LMDB's own
 * (the file layout every existing data directory has, private files, putNow beside writes in flight).
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { open } from 'lmdb';
import { Registry } from '../src/kms/registry/index.js';
import { LmdbStore } from '../src/kms/registry/lmdb.js';
import { tempDir } from './helpers/kms.js';
import { registryStoreSuite, runningRotation } from './helpers/registry-store-suite.js';

registryStoreSuite('lmdb', async (t) => LmdbStore.open(tempDir(t, 'pdb-store-')));

/** Writes a registry the way every earlier version did: four sub-databases, kek versions as numbers. */
async function writeLegacyRegistry(dataDir: string): Promise<void> {
  const root = open({ path: path.join(dataDir, 'registry.mdb'), compression: false, maxDbs: 8 });
  const wrapped = Buffer.alloc(60, 7);
  root.transactionSync(() => {
    const meta = root.openDB({ name: 'meta' });
    meta.putSync('format', 1);
    meta.putSync('kcv', Buffer.alloc(16, 1));
    meta.putSync('kek', { kekId: 'kek_1', activeVersion: 2, createdAt: 'then' });
    meta.putSync('rotation', { state: 'completed', target: 2, cursor: null, done: 1, total: 1 });
    meta.putSync('audit_head', { session: 3, links: null, heads: [], sealed: true });
    const keks = root.openDB({ name: 'keks' });
    for (const version of [2, 10]) {
      keks.putSync(version, { kekId: 'kek_1', version, wrapped, createdAt: 'then', refs: 1 });
    }
    root.openDB({ name: 'deks' }).putSync('dek_a', { keyId: 'dek_a', threadId: 't1', state: 'active' });
    root.openDB({ name: 'threads' }).putSync('t1', 'dek_a');
  });
  await root.close();
}

test('lmdb: a registry written by earlier versions reads through the store keys unchanged', async (t) => {
  const dataDir = tempDir(t, 'pdb-store-');
  await writeLegacyRegistry(dataDir);
  const store = LmdbStore.open(dataDir);
  t.teardown(() => store.close());
  t.is(await store.get('meta/format'), 1);
  t.is((store.peek('meta/kek') as { activeVersion: number }).activeVersion, 2);
  t.is((store.peek('rotation') as { state: string }).state, 'completed');
  t.is((store.peek('audit-head') as { session: number }).session, 3);
  t.deepEqual(Buffer.from(store.peek('meta/kcv') as Uint8Array), Buffer.alloc(16, 1));
  t.is(store.peek('thread/t1'), 'dek_a');
  t.is((store.peek('dek/dek_a') as { threadId: string }).threadId, 't1');
  // Number keys keep their numeric order (10 after 2), as the rotation's keyring walk expects.
  t.deepEqual(
    (await store.range('kek/')).map((e) => e.key),
    ['kek/2', 'kek/10'],
  );
  t.is(await store.count('thread/'), 1);
  t.is(LmdbStore.readOnce(dataDir, 'thread/t1'), 'dek_a', 'read-only beside the open store');
});

test('lmdb: the registry over a legacy directory mirrors its keyring and rotation', async (t) => {
  const dataDir = tempDir(t, 'pdb-store-');
  await writeLegacyRegistry(dataDir);
  const registry = await Registry.openDataDir(dataDir);
  t.teardown(() => registry.close());
  t.deepEqual(
    registry.keks().map((k) => k.version),
    [2, 10],
  );
  t.is(registry.kekMeta()?.activeVersion, 2);
  t.is(registry.rotation()?.state, 'completed');
  t.is(registry.peekKeyIdForThread('t1'), 'dek_a');
  t.is(registry.peekDek('dek_a')?.threadId, 't1');
  t.is(registry.peekDek('dek_missing'), undefined);
  t.is(await registry.dek('dek_missing'), undefined);
  t.is(Registry.readAuditHead(dataDir)?.session, 3);
});

test('lmdb: an unknown registry format is refused and the store closed again', async (t) => {
  const dataDir = tempDir(t, 'pdb-store-');
  const store = LmdbStore.open(dataDir);
  await store.transaction({ puts: [{ key: 'meta/format', value: 99 }] });
  await store.close();
  await t.throwsAsync(Registry.openDataDir(dataDir), { message: /registry format 99/ });
  // Closed after the refusal: the same process can open it again.
  const again = LmdbStore.open(dataDir);
  t.is(await again.get('meta/format'), 99);
  await again.close();
});

test('lmdb: registry files are created 0600', async (t) => {
  const dataDir = tempDir(t, 'pdb-store-');
  const store = LmdbStore.open(dataDir);
  await store.transaction({ puts: [{ key: 'dek/x', value: 'x' }] });
  await store.close();
  for (const name of ['registry.mdb', 'registry.mdb-lock']) {
    t.is(fs.statSync(path.join(dataDir, name)).mode & 0o777, 0o600, name);
  }
});

test('lmdb: putNow commits at once when idle and after the writes in flight otherwise', async (t) => {
  const store = LmdbStore.open(tempDir(t, 'pdb-store-'));
  t.teardown(() => store.close());
  store.putNow('audit-head', { session: 'idle' });
  t.deepEqual(store.peek('audit-head'), { session: 'idle' }, 'committed before putNow returned');
  const inFlight = store.transaction({ puts: [{ key: 'dek/a', value: 'a' }] });
  store.putNow('audit-head', { session: 'joined' });
  t.deepEqual(store.peek('audit-head'), { session: 'idle' }, 'joined the write in flight');
  await inFlight;
  // A later synchronous save commits after the joined one, never before it.
  await new Promise((resolve) => setImmediate(resolve));
  store.putNow('audit-head', { session: 'last' });
  await store.transaction({});
  t.deepEqual(store.peek('audit-head'), { session: 'last' });
});

test('createDek refuses a key wrapped under a KEK version the registry no longer has', async (t) => {
  const registry = await Registry.openDataDir(tempDir(t));
  t.teardown(() => registry.close());
  const now = new Date().toISOString();
  const stored = await registry.createDek({
    keyId: 'dek_retired',
    threadId: 'thread-retired',
    createdAt: now,
    state: 'active',
    current: 1,
    versions: [{ v: 1, kek: 7, wrapped: Buffer.alloc(60), createdAt: now }],
  });
  t.is(stored, 'kek-retired');
  t.is(await registry.keyIdForThread('thread-retired'), undefined);
  t.is(await registry.dek('dek_retired'), undefined);
});

test("createDek never replaces another thread's key that has the same key id", async (t) => {
  const registry = await Registry.openDataDir(tempDir(t));
  t.teardown(() => registry.close());
  const now = new Date().toISOString();
  const kek = { kekId: 'kek_1', version: 1, wrapped: Buffer.alloc(72, 1), createdAt: now, refs: 0 };
  t.true(await registry.initKek({ kekId: 'kek_1', activeVersion: 1, createdAt: now }, kek, Buffer.alloc(16)));
  const record = (threadId: string, fill: number) => ({
    keyId: 'dek_same',
    threadId,
    createdAt: now,
    state: 'active' as const,
    current: 1,
    versions: [{ v: 1, kek: 1, wrapped: Buffer.alloc(60, fill), createdAt: now }],
  });
  const first = await registry.createDek(record('thread-a', 1));
  t.is(typeof first === 'string' ? first : first.threadId, 'thread-a');
  t.is(await registry.createDek(record('thread-b', 2)), 'id-taken');
  const kept = await registry.dek('dek_same');
  t.is(kept?.threadId, 'thread-a');
  t.deepEqual(Buffer.from(kept?.versions[0]?.wrapped ?? []), Buffer.alloc(60, 1), 'the first key is intact');
  t.is(await registry.keyIdForThread('thread-b'), undefined);
  t.is(registry.kek(1)?.refs, 1, 'only the stored key counts against its KEK version');
});

test('beginRotation refuses a KEK made under another master key than the registry names (a re-key happened)', async (t) => {
  const registry = await Registry.openDataDir(tempDir(t));
  t.teardown(() => registry.close());
  const now = new Date().toISOString();
  const kek = (version: number) => ({
    kekId: 'kek_1',
    version,
    wrapped: Buffer.alloc(72, version),
    createdAt: now,
    refs: 0,
  });
  t.true(
    await registry.initKek({ kekId: 'kek_1', activeVersion: 1, createdAt: now }, kek(1), Buffer.alloc(16, 1)),
  );
  const rotation = runningRotation(2, now);
  await t.throwsAsync(registry.beginRotation(kek(2), rotation, Buffer.alloc(16, 2)), {
    code: 'MASTER_KEY_MISMATCH',
  });
  t.is(registry.kekMeta()?.activeVersion, 1, 'nothing was written');
  await registry.beginRotation(kek(2), rotation, Buffer.alloc(16, 1));
  t.is(registry.kekMeta()?.activeVersion, 2);
});
