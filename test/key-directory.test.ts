/**
 * The key directory: data ops name their DEK version by a shared entry instead of a cloned DekRef.
 * Entries read back as written; one is reused only once no task in flight names it, under a new
 * generation a worker tells apart from the old; keys that do not fit fall back to DekRefs; and
 * through the KMS, many more keys than entries still encrypt, decrypt and audit correctly.
 */
import test from 'ava';
import { Piscina } from 'piscina';
import { DekDirectory } from '../src/kms/dek-directory.js';
import { workerFile } from '../src/kms/pool.js';
import { oneOffWorkerInit } from '../src/kms/verify-audit.js';
import {
  type AuditCaller,
  type BatchResult,
  BatchResultReader,
  BatchTaskWriter,
  KeyDirectoryView,
  newKeyDirectory,
  OpKind,
  type TaskOutcome,
} from '../src/worker-abi/index.js';
import { KeyDirectoryEntries } from '../workers/key-directory-entries.js';
import { auditLines, openKms, randomKeyHex } from './helpers/kms.js';

const ref = (keyId: string, keyVersion = 1, kekVersion = 1) => ({
  keyId,
  keyVersion,
  kekVersion,
  wrapped: Uint8Array.from({ length: 82 }, (_, i) => (i * 7 + keyVersion) & 0xff),
});

test('an entry reads back as written; another generation, or an id too long to fit, reads as nothing', (t) => {
  const init = newKeyDirectory(4);
  const view = new KeyDirectoryView(init);
  const dek = ref('dek_0123456789abcdef', 3, 2);
  t.true(view.write(1, 7, dek, 'thread-ü-🧵'));
  t.deepEqual(view.read(1, 7), { index: 1, generation: 7, ...dek, threadId: 'thread-ü-🧵' });
  t.true(view.write(2, 1, dek, undefined));
  t.is(view.read(2, 1)?.threadId, undefined);
  t.is(view.read(1, 8), null, 'a generation the entry does not hold');
  t.is(view.read(0, 0), null, 'an entry never written (generations start at 1)');
  t.is(view.read(9, 1), null, 'out of range');
  t.false(view.write(3, 1, ref('k'.repeat(200)), 't'.repeat(200)), 'too long for one entry');
  t.is(view.read(3, 1), null, 'nothing was written');
});

test('the directory gives one entry per DEK version and reuses one only once no task in flight names it', (t) => {
  const directory = new DekDirectory(newKeyDirectory(2));
  const view = new KeyDirectoryView(directory.init);
  const [a, b, c] = [ref('a'), ref('b'), ref('c')];
  // Task 0 names a and b: the directory is full, and c cannot take either while task 0 is in flight.
  const atA = directory.entryFor(a, 'ta', 0, 0);
  const atB = directory.entryFor(b, 'tb', 0, 0);
  t.not(atA, atB);
  t.is(directory.entryFor(a, 'ta', 0, 0), atA, 'the same version, the same entry');
  t.is(directory.entryFor(c, 'tc', 0, 0), -1, 'no entry free: c travels as a DekRef');
  t.is(directory.entryFor(c, 'tc', 1, 0), -1, 'task 0 still in flight');
  const oldGeneration = directory.generation(atA);

  // Task 0 settled; task 2 names b again, so c takes a's entry (b is referenced, and in flight).
  t.is(directory.entryFor(b, 'tb', 2, 2), atB);
  const atC = directory.entryFor(c, 'tc', 2, 2);
  t.is(atC, atA);
  t.not(directory.generation(atC), oldGeneration);
  t.is(view.read(atA, oldGeneration), null, 'a worker holding a under the old generation sees it changed');
  t.is(view.read(atC, directory.generation(atC))?.keyId, 'c');
  // a comes back under an entry of its own once one is free again.
  t.is(directory.entryFor(a, 'ta', 3, 3), atB, 'b was not named since task 2');
  t.is(directory.entryFor(a, 'other-thread', 3, 3), -1, 'a thread id the entry does not hold');
});

test('a key too long for an entry falls back without using one up', (t) => {
  const directory = new DekDirectory(newKeyDirectory(1));
  t.is(directory.entryFor(ref('k'.repeat(300)), 't'.repeat(100), 0, 0), -1);
  t.is(directory.entryFor(ref('short'), 'thread', 0, 0), 0, 'the entry is still free');
});

test('a worker keeps one audit site per key, op and caller across tasks, and rereads a new generation', (t) => {
  const directory = new DekDirectory(newKeyDirectory(1));
  const entries = new KeyDirectoryEntries(directory.init);
  const at = directory.entryFor(ref('a'), 'thread-a', 0, 0);
  const entry = entries.entry(at, directory.generation(at));
  t.is(entries.entry(at, directory.generation(at)), entry, 'read once');
  // Each task clones its callers: equal values, new objects, made canonical once per task.
  const taskCallers = () => [
    { op: 'encrypt', caller: 'embedded', remote: undefined },
    { op: 'decrypt', caller: 'embedded', remote: undefined },
    { op: 'encrypt', caller: 'embedded', remote: '' },
  ];
  const [encrypt, decrypt, emptyRemote] = entries.canonicalCallers(taskCallers()) as AuditCaller[];
  t.deepEqual(entries.canonicalCallers(taskCallers()), [encrypt, decrypt, emptyRemote]);
  const fields = entries.site(entry, encrypt as AuditCaller).fields;
  t.is(entries.site(entry, entries.canonicalCallers(taskCallers())[0] as AuditCaller).fields, fields);
  t.deepEqual(fields, {
    op: 'encrypt',
    keyId: 'a',
    threadId: 'thread-a',
    kekVersion: 1,
    caller: 'embedded',
    remote: undefined,
  });
  t.not(entries.site(entry, decrypt as AuditCaller).fields, fields);
  t.is(entries.site(entry, encrypt as AuditCaller).fields, fields, 'and again after another caller');
  t.is(
    entries.site(entry, emptyRemote as AuditCaller).fields.remote,
    '',
    'an empty remote is not an absent one',
  );

  const stale = directory.generation(at);
  t.is(directory.entryFor(ref('b'), 'thread-b', 1, 1), at, 'the entry goes to b');
  t.is(entries.entry(at, directory.generation(at)).keyId, 'b');
  t.throws(() => entries.entry(at, stale), { message: /not the one named/ });
});

test('a crypto worker fails an op naming an entry it cannot find with INTERNAL, and only that op', async (t) => {
  const name = 'PROGRESSDB_TEST_DIRECTORY_MASTER_KEY';
  process.env[name] = randomKeyHex();
  t.teardown(() => {
    delete process.env[name];
  });
  const pool = new Piscina({
    filename: workerFile('crypto'),
    minThreads: 1,
    maxThreads: 1,
    workerData: { ...oneOffWorkerInit({ kind: 'env', name }), keyDirectory: newKeyDirectory(4) },
  });
  t.teardown(() => pool.destroy());
  const plaintext = Buffer.from('x');
  const bytes = BatchTaskWriter.bytesFor(OpKind.encrypt, plaintext.length, 0);
  const writer = new BatchTaskWriter(2, bytes);
  // Entry 2 was never written: no generation 5 there.
  writer.add(OpKind.encrypt, -1, plaintext, null, -1, -1, 2, 5, 0);
  writer.add(OpKind.note, -1, null, null, -1, -1);
  const task = writer.finish({
    keks: [],
    deks: [],
    targetKekVersion: 1,
    audit: [],
    callers: [{ op: 'encrypt', caller: 'test', remote: undefined }],
    errors: [],
  });
  const outcome = (await pool.run(task, {
    transferList: BatchTaskWriter.transferList(task),
  })) as TaskOutcome<BatchResult>;
  if (!outcome.ok) return t.fail(outcome.error.message);
  const result = new BatchResultReader(outcome.value);
  t.is(result.error(0)?.code, 'INTERNAL');
  t.is(result.error(1), null, 'the rest of the batch ran');
});

test('through the KMS: far more keys than the workers cache, every one round-trips and is audited under its own ids', async (t) => {
  // dekCacheSize 1: a one-key worker cache, so the key cached for an entry is replaced all the
  // time (entry reuse itself is covered above: the directory has 50,000 entries).
  const { kms, dataDir } = await openKms(t, { poolSize: 2, dekCacheSize: 1, auditDataOps: 'each' });
  const threads = Array.from({ length: 700 }, (_, i) => `thread-${i}`);
  const keyIds = (await Promise.all(threads.map((thread) => kms.createDekForThread(thread)))).map(
    (r) => r.keyId,
  );
  for (let round = 0; round < 3; round++) {
    const items = keyIds.map((keyId, i) => ({ keyId, plaintext: Buffer.from(`m-${round}-${i}`) }));
    const sealed = await Promise.all(items.map((item) => kms.encrypt(item.keyId, item.plaintext)));
    const opened = await kms.decryptBatch(
      sealed.map((s, i) => ({ keyId: keyIds[i] as string, ciphertext: s.ciphertext })),
    );
    t.deepEqual(
      opened.map((r) => (r.ok ? r.value.toString() : r.error.code)),
      items.map((item) => item.plaintext.toString()),
    );
  }
  const threadOf = new Map(keyIds.map((keyId, i) => [keyId, threads[i]]));
  const data = auditLines(dataDir).filter((l) => l.op === 'encrypt' || l.op === 'decrypt');
  t.is(data.length, 2 * 3 * keyIds.length);
  t.true(data.every((l) => l.outcome === 'ok' && l.thread_id === threadOf.get(l.key_id as string)));
  t.true(data.every((l) => l.caller === 'embedded' && l.kek_version === '1'));
  t.true((await kms.verifyAudit()).ok);
});
