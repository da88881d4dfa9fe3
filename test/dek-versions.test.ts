/**
 * DEK version arithmetic (src/kms/dek-versions.ts) on hand-made records: no KMS, no registry, no
 * workers, like the policy tests of Vault's keysutil.
 */
import test from 'ava';
import { MIN_CIPHERTEXT_OVERHEAD } from '../src/format.js';
import {
  addKekRefDeltas,
  addVersion,
  applyVersionRewraps,
  cancelDestruction,
  currentVersion,
  type DekRecord,
  type DekVersionRecord,
  dataOpRefs,
  destroyAll,
  destroyIfDue,
  destroyVersionsBefore,
  dropsKeyMaterial,
  nextVersion,
  requireActive,
  scheduleDestruction,
} from '../src/kms/dek-versions.js';

const T0 = '2026-01-01T00:00:00.000Z';

function version(v: number, kek = 1): DekVersionRecord {
  return { v, kek, wrapped: Buffer.from(`wrapped-${v}-under-${kek}`), createdAt: T0 };
}

function record(versions: DekVersionRecord[], current = versions.at(-1)?.v ?? 1): DekRecord {
  return { keyId: 'dek_1', threadId: 't1', createdAt: T0, state: 'active', current, versions };
}

/** A ciphertext header naming DEK version `v` (the rest does not matter here). */
function ciphertextOf(v: number): Buffer {
  const out = Buffer.alloc(MIN_CIPHERTEXT_OVERHEAD + 4);
  out[0] = 0x01;
  out.writeUInt32BE(v, 1);
  return out;
}

test('currentVersion finds the current version; a record without it is STORE_CORRUPT', (t) => {
  const r = record([version(1), version(2, 3)]);
  t.like(currentVersion(r), { v: 2, kek: 3 });
  t.throws(() => currentVersion({ ...r, current: 5 }), { code: 'STORE_CORRUPT' });
});

test('nextVersion is one above the highest version, also after older ones were destroyed', (t) => {
  t.is(nextVersion(record([version(1)])), 2);
  t.is(nextVersion(record([version(3), version(4)])), 5);
  t.is(nextVersion(record([version(7)], 7)), 8);
});

test('addVersion makes the new version current and keeps the others', (t) => {
  const r = record([version(1)]);
  const added = addVersion(r, version(2, 4));
  t.is(added.current, 2);
  t.deepEqual(
    added.versions.map((x) => [x.v, x.kek]),
    [
      [1, 1],
      [2, 4],
    ],
  );
  t.is(r.versions.length, 1, 'the input record is not changed');
});

test('addVersion is CONFLICT when the record already has that version or a later one', (t) => {
  const r = record([version(1), version(2)]);
  t.throws(() => addVersion(r, version(2)), { code: 'CONFLICT' });
  t.throws(() => addVersion(r, version(1)), { code: 'CONFLICT' });
  t.notThrows(() => addVersion(r, version(3)));
});

test('addVersion on a destroyed key is KEY_NOT_FOUND', (t) => {
  const { record: tombstone } = destroyAll(record([version(1)]), T0);
  t.throws(() => addVersion(tombstone, version(2)), { code: 'KEY_NOT_FOUND' });
});

test('destroyVersionsBefore removes the versions below N and names them', (t) => {
  const r = record([version(1), version(2), version(3)]);
  const { record: kept, destroyed } = destroyVersionsBefore(r, 3);
  t.deepEqual(destroyed, [1, 2]);
  t.deepEqual(
    kept.versions.map((x) => x.v),
    [3],
  );
  t.is(kept.current, 3);
});

test('destroyVersionsBefore keeping every version is no change (the same record)', (t) => {
  const r = record([version(2), version(3)]);
  const result = destroyVersionsBefore(r, 2);
  t.is(result.record, r);
  t.deepEqual(result.destroyed, []);
  t.is(destroyVersionsBefore(r, 1).record, r);
});

test('destroyVersionsBefore refuses N above current, N not a positive integer, and tombstones', (t) => {
  const r = record([version(1), version(2)]);
  t.throws(() => destroyVersionsBefore(r, 3), {
    code: 'INVALID_INPUT',
    message: /above the current version 2/,
  });
  for (const bad of [0, -1, 1.5, Number.NaN]) {
    t.throws(() => destroyVersionsBefore(r, bad), { code: 'INVALID_INPUT' }, String(bad));
  }
  t.throws(() => destroyVersionsBefore(destroyAll(r, T0).record, 1), { code: 'KEY_NOT_FOUND' });
});

test('destroyAll leaves a tombstone without versions; destroying it again is no change', (t) => {
  const r = record([version(1), version(2)]);
  const first = destroyAll(r, T0);
  t.deepEqual(first.destroyed, [1, 2]);
  t.like(first.record, { state: 'destroyed', destroyedAt: T0, versions: [] });
  const again = destroyAll(first.record, T0);
  t.is(again.record, first.record);
  t.deepEqual(again.destroyed, []);
});

test('applyVersionRewraps applies a rewrap only while the record holds its source bytes', (t) => {
  const r = record([version(1), version(2)]);
  const to = Buffer.from('new');
  const result = applyVersionRewraps(r, [
    { v: 2, from: version(2).wrapped, to, toKek: 2 },
    // Stale: version 1 was rewrapped (or rotated) since these bytes were read.
    { v: 1, from: Buffer.from('something else'), to, toKek: 2 },
    // Gone: version 9 was destroyed since.
    { v: 9, from: version(9).wrapped, to, toKek: 2 },
  ]);
  t.is(result.applied, 1);
  t.deepEqual(
    result.record.versions.map((x) => [x.v, x.kek]),
    [
      [1, 1],
      [2, 2],
    ],
  );
  t.is(result.record.versions[1]!.wrapped, to);
  t.is(result.record.versions[0], r.versions[0], 'untouched versions are shared');
});

test('applyVersionRewraps with nothing applicable, or on a tombstone, returns the same record', (t) => {
  const r = record([version(1)]);
  const stale = [{ v: 1, from: Buffer.from('stale'), to: Buffer.from('x'), toKek: 2 }];
  t.is(applyVersionRewraps(r, stale).record, r);
  const tombstone = destroyAll(r, T0).record;
  const fresh = [{ v: 1, from: version(1).wrapped, to: Buffer.from('x'), toKek: 2 }];
  t.deepEqual(applyVersionRewraps(tombstone, fresh), { record: tombstone, applied: 0 });
});

test('addKekRefDeltas counts the versions each KEK version gains and loses, across records', (t) => {
  const before = record([version(1, 1), version(2, 1)]);
  const after = record([version(1, 1), version(2, 3)]);
  const deltas = addKekRefDeltas(new Map(), before, after);
  t.deepEqual([...deltas].sort(), [
    [1, -1],
    [3, 1],
  ]);
  addKekRefDeltas(deltas, undefined, record([version(1, 3)]));
  addKekRefDeltas(deltas, after, undefined);
  t.deepEqual([...deltas].sort(), [
    [1, -2],
    [3, 1],
  ]);
});

test('dataOpRefs: encrypt uses current, decrypt the version named, reencrypt both', (t) => {
  const r = record([version(1, 1), version(2, 2)]);
  t.deepEqual(
    dataOpRefs(r, 'encrypt', Buffer.alloc(3)).map((d) => d.keyVersion),
    [2],
  );
  t.deepEqual(
    dataOpRefs(r, 'decrypt', ciphertextOf(1)).map((d) => [d.keyVersion, d.kekVersion]),
    [[1, 1]],
  );
  t.deepEqual(
    dataOpRefs(r, 'reencrypt', ciphertextOf(1)).map((d) => d.keyVersion),
    [2, 1],
  );
  const ref = dataOpRefs(r, 'decrypt', ciphertextOf(1))[0]!;
  t.deepEqual(Buffer.from(ref.wrapped), Buffer.from(version(1).wrapped));
  t.is(dataOpRefs(r, 'decrypt', ciphertextOf(1))[0], ref, 'refs are cached per record object');
});

test('dataOpRefs: a ciphertext naming a version the key lacks, or no version, is DECRYPT_FAILED', (t) => {
  const r = destroyVersionsBefore(record([version(1), version(2)]), 2).record;
  t.throws(() => dataOpRefs(r, 'decrypt', ciphertextOf(1)), { code: 'DECRYPT_FAILED' });
  t.throws(() => dataOpRefs(r, 'reencrypt', ciphertextOf(7)), { code: 'DECRYPT_FAILED' });
  t.throws(() => dataOpRefs(r, 'decrypt', Buffer.from('short')), { code: 'DECRYPT_FAILED' });
  t.is(dataOpRefs(r, 'decrypt', ciphertextOf(2))[0]!.keyVersion, 2);
});

test('dropsKeyMaterial: a deleted or destroyed key, or one with earlier versions destroyed; not a rotation', (t) => {
  t.true(dropsKeyMaterial(undefined));
  t.true(dropsKeyMaterial({ ...record([version(1)]), state: 'destroyed' }));
  t.true(dropsKeyMaterial(record([version(3), version(4)])));
  t.false(dropsKeyMaterial(record([version(1)])));
  t.false(dropsKeyMaterial(record([version(1), version(2), version(3)])), 'rotated: every version kept');
  t.false(dropsKeyMaterial(record([version(1, 2), version(2, 2)])), 'rewrapped under a new KEK');
});

test('a deletion window: scheduled once, refused for use, cancelled back as it was, destroyed only once due', (t) => {
  const r = record([version(1), version(2)]);
  const due = '2026-01-08T00:00:00.000Z';
  const pending = scheduleDestruction(r, due);
  t.like(pending, { state: 'pending-deletion', deletionDueAt: due, current: 2 });
  t.is(pending.versions, r.versions, 'every version kept until the window ends');
  t.true(dropsKeyMaterial(pending), 'workers drop the key at once');
  t.is(
    scheduleDestruction(pending, '2026-02-01T00:00:00.000Z'),
    pending,
    'a second destroy keeps the due time',
  );
  t.throws(() => requireActive(pending), { code: 'KEY_PENDING_DELETION', message: new RegExp(due) });
  t.throws(() => addVersion(pending, version(3)), { code: 'KEY_PENDING_DELETION' });
  t.throws(() => destroyVersionsBefore(pending, 2), { code: 'KEY_PENDING_DELETION' });

  const dueMs = Date.parse(due);
  t.deepEqual(cancelDestruction(pending, dueMs - 1), r);
  t.throws(() => cancelDestruction(r, dueMs - 1), { code: 'KEY_NOT_PENDING_DELETION' });
  t.throws(() => cancelDestruction(pending, dueMs), { code: 'KEY_NOT_FOUND', message: /window .* ended/ });

  t.is(destroyIfDue(pending, dueMs - 1).record, pending, 'not yet');
  t.is(destroyIfDue(r, dueMs + 1).record, r, 'an active key is never destroyed by the sweep');
  const gone = destroyIfDue(pending, dueMs);
  t.deepEqual(gone.destroyed, [1, 2]);
  t.like(gone.record, { state: 'destroyed', versions: [], destroyedAt: due });
  t.false('deletionDueAt' in gone.record);
  t.is(scheduleDestruction(gone.record, due), gone.record);
  t.throws(() => cancelDestruction(gone.record, dueMs), {
    code: 'KEY_NOT_FOUND',
    message: /was destroyed at/,
  });
});
