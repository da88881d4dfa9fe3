/**
 * Embedded KMS key rotation: KEK rotation (offline and under load), rewrapDek, DEK versions with
 * reencrypt and destruction, and crypto-shredding with destroyDek.
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { expectCode, openKms } from './helpers/kms.js';

test('rotateKek rewraps every DEK, destroys the old KEK version and old ciphertexts still decrypt', async (t) => {
  const fixture = await openKms(t, { poolSize: 2, rotationBatchSize: 7 });
  const { kms } = fixture;
  const messages = await Promise.all(
    Array.from({ length: 40 }, async (_, i) => {
      const dek = await kms.createDekForThread(`thread-${i}`);
      const aad = Buffer.from(`aad-${i}`);
      const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from(`message ${i}`), aad);
      return { dek, aad, ciphertext, plaintext: Buffer.from(`message ${i}`) };
    }),
  );
  const before = await kms.rotationStatus();
  t.like(before, { state: 'idle', activeKekVersion: 1, kekVersions: [1] });

  const status = await kms.rotateKek();
  t.like(status, { state: 'completed', activeKekVersion: 2, targetKekVersion: 2, kekVersions: [2] });
  t.is(status.total, 40);
  t.is(status.done, status.total);
  t.truthy(status.finishedAt);
  t.deepEqual(await kms.rotationStatus(), status);
  for (const m of messages) {
    t.deepEqual(await kms.decrypt(m.dek.keyId, m.ciphertext, m.aad), m.plaintext);
    const info = await kms.getWrappedDek(m.dek.keyId);
    t.is(info.kekVersion, 2);
    t.notDeepEqual(info.wrapped, m.dek.wrapped, 'rewrapped under the new KEK');
    t.is(info.keyId, m.dek.keyId);
  }
  const created = await kms.createDekForThread('thread-after');
  t.is(created.kekVersion, 2);

  // Again, and across a restart: still only the active version is kept.
  t.like(await kms.rotateKek(), { state: 'completed', activeKekVersion: 3, kekVersions: [3] });
  await kms.close();
  const reopened = await fixture.reopen();
  t.like(await reopened.rotationStatus(), { activeKekVersion: 3, kekVersions: [3] });
  for (const m of messages)
    t.deepEqual(await reopened.decrypt(m.dek.keyId, m.ciphertext, m.aad), m.plaintext);
  t.true((await reopened.verifyAudit()).ok);
});

test('rotateKek online: concurrent encrypt, decrypt and create keep working and everything decrypts', async (t) => {
  const { kms } = await openKms(t, { poolSize: 2, rotationBatchSize: 10 });
  const deks = await Promise.all(
    Array.from({ length: 300 }, (_, i) => kms.createDekForThread(`thread-${i}`)),
  );
  const stored: { keyId: string; ciphertext: Buffer; plaintext: string }[] = [];
  for (const [i, dek] of deks.entries()) {
    const plaintext = `before rotation ${i}`;
    stored.push({ keyId: dek.keyId, plaintext, ...(await kms.encrypt(dek.keyId, Buffer.from(plaintext))) });
  }

  const errors: string[] = [];
  let rotating = true;
  let duringRotation = 0;
  let seenRunning = false;
  const worker = async (w: number) => {
    for (let i = 0; rotating || i < 5; i++) {
      try {
        const pick = stored[(w * 7919 + i * 31) % stored.length]!;
        t.is((await kms.decrypt(pick.keyId, pick.ciphertext)).toString(), pick.plaintext);
        const dek = deks[(w + i) % deks.length]!;
        const plaintext = `during rotation ${w}/${i}`;
        const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from(plaintext));
        stored.push({ keyId: dek.keyId, ciphertext, plaintext });
        if (i % 10 === 0) {
          const fresh = await kms.createDekForThread(`thread-new-${w}-${i}`);
          const made = await kms.encrypt(fresh.keyId, Buffer.from(`new key ${w}/${i}`));
          stored.push({ keyId: fresh.keyId, ciphertext: made.ciphertext, plaintext: `new key ${w}/${i}` });
        }
        if (rotating) {
          duringRotation++;
          const status = await kms.rotationStatus();
          if (status.state === 'running' && status.done > 0 && status.done < status.total) seenRunning = true;
        }
      } catch (err) {
        errors.push(String((err as { code?: string }).code ?? err));
      }
    }
  };
  const load = Promise.all(Array.from({ length: 8 }, (_, w) => worker(w)));
  const status = await kms.rotateKek().finally(() => {
    rotating = false;
  });
  await load;
  t.deepEqual(errors, []);
  t.true(duringRotation > 0, 'operations completed while the rotation ran');
  t.true(seenRunning, 'the rotation was seen part-way through');
  t.like(status, { state: 'completed', activeKekVersion: 2, kekVersions: [2] });
  const results = await kms.decryptBatch(stored.map((s) => ({ keyId: s.keyId, ciphertext: s.ciphertext })));
  for (const [i, r] of results.entries())
    t.deepEqual(r, { ok: true, value: Buffer.from(stored[i]!.plaintext) });
  for (const dek of deks.slice(0, 20)) t.is((await kms.getWrappedDek(dek.keyId)).kekVersion, 2);
});

test('rewrapDek rewraps every version of one key under the active KEK', async (t) => {
  const fixture = await openKms(t);
  const { kms } = fixture;
  const dek = await kms.createDekForThread('thread-rewrap');
  const v1 = await kms.encrypt(dek.keyId, Buffer.from('under v1'));
  await kms.rotateDek(dek.keyId);
  const v2 = await kms.encrypt(dek.keyId, Buffer.from('under v2'));
  const before = await kms.getWrappedDek(dek.keyId);

  const rewrapped = await kms.rewrapDek(dek.keyId);
  t.is(rewrapped.keyId, dek.keyId);
  t.is(rewrapped.keyVersion, 2);
  t.is(rewrapped.kekVersion, (await kms.health()).activeKekVersion);
  t.notDeepEqual(rewrapped.wrapped, before.wrapped, 'a fresh wrapping');
  t.deepEqual(await kms.decrypt(dek.keyId, v1.ciphertext), Buffer.from('under v1'));
  t.deepEqual(await kms.decrypt(dek.keyId, v2.ciphertext), Buffer.from('under v2'));

  // After a KEK rotation, a rewrap keeps the key under the (new) active version.
  await kms.rotateKek();
  const again = await kms.rewrapDek(dek.keyId);
  t.is(again.kekVersion, 2);
  await kms.close();
  const reopened = await fixture.reopen();
  t.deepEqual(await reopened.decrypt(dek.keyId, v1.ciphertext), Buffer.from('under v1'));
  t.deepEqual(await reopened.decrypt(dek.keyId, v2.ciphertext), Buffer.from('under v2'));
  t.deepEqual((await reopened.getWrappedDek(dek.keyId)).wrapped, again.wrapped);
});

test('rotateDek, reencrypt and destroyDekVersionsBefore: old-version ciphertexts stop decrypting', async (t) => {
  const fixture = await openKms(t);
  const { kms } = fixture;
  const dek = await kms.createDekForThread('thread-versions');
  const aad = Buffer.from('thread-versions/m1');
  const old = await kms.encrypt(dek.keyId, Buffer.from('old message'), aad);
  t.is(old.keyVersion, 1);

  const rotated = await kms.rotateDek(dek.keyId);
  t.is(rotated.keyId, dek.keyId);
  t.is(rotated.keyVersion, 2);
  t.notDeepEqual(rotated.wrapped, dek.wrapped);
  t.is((await kms.createDekForThread('thread-versions')).keyVersion, 2);
  const fresh = await kms.encrypt(dek.keyId, Buffer.from('new message'), aad);
  t.is(fresh.keyVersion, 2);
  t.deepEqual(
    await kms.decrypt(dek.keyId, old.ciphertext, aad),
    Buffer.from('old message'),
    'v1 still decrypts',
  );

  const re = await kms.reencrypt(dek.keyId, old.ciphertext, aad);
  t.is(re.keyVersion, 2);
  t.notDeepEqual(re.ciphertext, old.ciphertext);
  t.deepEqual(await kms.decrypt(dek.keyId, re.ciphertext, aad), Buffer.from('old message'));
  await expectCode(t, kms.reencrypt(dek.keyId, old.ciphertext, Buffer.from('wrong')), 'DECRYPT_FAILED');

  t.deepEqual(await kms.destroyDekVersionsBefore(dek.keyId, 2), {
    keyId: dek.keyId,
    destroyedVersions: [1],
    deletionDueAt: null,
  });
  await expectCode(t, kms.decrypt(dek.keyId, old.ciphertext, aad), 'DECRYPT_FAILED');
  await expectCode(t, kms.reencrypt(dek.keyId, old.ciphertext, aad), 'DECRYPT_FAILED');
  t.deepEqual(await kms.decrypt(dek.keyId, re.ciphertext, aad), Buffer.from('old message'));
  t.deepEqual(await kms.decrypt(dek.keyId, fresh.ciphertext, aad), Buffer.from('new message'));
  t.deepEqual(await kms.destroyDekVersionsBefore(dek.keyId, 2), {
    keyId: dek.keyId,
    destroyedVersions: [],
    deletionDueAt: null,
  });

  // Version numbers keep growing after a destruction; and all of it survives a restart.
  t.is((await kms.rotateDek(dek.keyId)).keyVersion, 3);
  await kms.close();
  const reopened = await fixture.reopen();
  await expectCode(t, reopened.decrypt(dek.keyId, old.ciphertext, aad), 'DECRYPT_FAILED');
  t.deepEqual(await reopened.decrypt(dek.keyId, re.ciphertext, aad), Buffer.from('old message'));
  t.is((await reopened.encrypt(dek.keyId, Buffer.from('v3'))).keyVersion, 3);
});

test('destroyDek crypto-shreds a key: every use is KEY_NOT_FOUND and the thread gets a new key', async (t) => {
  const fixture = await openKms(t, { poolSize: 2 });
  const { kms } = fixture;
  const dek = await kms.createDekForThread('thread-shred');
  const keep = await kms.createDekForThread('thread-keep');
  const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from('shred me'));
  const kept = await kms.encrypt(keep.keyId, Buffer.from('keep me'));
  await kms.rotateDek(dek.keyId);

  t.deepEqual(await kms.destroyDek(dek.keyId), {
    keyId: dek.keyId,
    destroyedVersions: [1, 2],
    deletionDueAt: null,
  });
  await expectCode(t, kms.decrypt(dek.keyId, ciphertext), 'KEY_NOT_FOUND');
  await expectCode(t, kms.encrypt(dek.keyId, Buffer.from('x')), 'KEY_NOT_FOUND');
  await expectCode(t, kms.getWrappedDek(dek.keyId), 'KEY_NOT_FOUND');
  await expectCode(t, kms.reencrypt(dek.keyId, ciphertext), 'KEY_NOT_FOUND');
  await expectCode(t, kms.rewrapDek(dek.keyId), 'KEY_NOT_FOUND');
  await expectCode(t, kms.rotateDek(dek.keyId), 'KEY_NOT_FOUND');
  t.deepEqual(
    await kms.destroyDek(dek.keyId),
    { keyId: dek.keyId, destroyedVersions: [], deletionDueAt: null },
    'idempotent',
  );
  t.is((await kms.health()).dekCount, 1);

  const replacement = await kms.createDekForThread('thread-shred');
  t.not(replacement.keyId, dek.keyId);
  t.is(replacement.keyVersion, 1);
  await expectCode(
    t,
    kms.decrypt(replacement.keyId, ciphertext),
    'DECRYPT_FAILED',
    'the new key cannot read it',
  );
  t.deepEqual(
    await kms.decrypt(keep.keyId, kept.ciphertext),
    Buffer.from('keep me'),
    'other keys unaffected',
  );

  // A KEK rotation after the shredding, and a restart: the key stays gone.
  t.like(await kms.rotateKek(), { state: 'completed', kekVersions: [2] });
  await kms.close();
  const reopened = await fixture.reopen();
  await expectCode(t, reopened.decrypt(dek.keyId, ciphertext), 'KEY_NOT_FOUND');
  t.is((await reopened.createDekForThread('thread-shred')).keyId, replacement.keyId);
  t.deepEqual(await reopened.decrypt(keep.keyId, kept.ciphertext), Buffer.from('keep me'));
});

test('rotation status reads running from the moment a rotation starts, never the previous completed one', async (t) => {
  const { kms } = await openKms(t);
  for (let i = 0; i < 50; i++) await kms.createDekForThread(`status-${i}`);
  const first = await kms.rotateKek();
  t.is(first.state, 'completed');
  t.is(first.activeKekVersion, 2);

  // The second rotation's KEK is made in a worker first; until then its record does not exist yet.
  const started = await kms.startKekRotation();
  t.is(started.state, 'running');
  t.is((await kms.rotationStatus()).state, 'running');
  // Joining the running rotation waits for it; what it resolves with is final.
  const finished = await kms.rotateKek();
  t.is(finished.state, 'completed');
  t.is(finished.activeKekVersion, 3);
  t.is((await kms.rotationStatus()).state, 'completed');
});

test('creates racing KEK rotations that retire the version they began under still succeed', async (t) => {
  // With nothing to rewrap, a rotation retires the old KEK version at once. A create that read the
  // old active version before the rotation must not store a key under the retired version (that
  // used to be a 500 STORE_CORRUPT "KEK version 1 is missing"): it is made again under the new one.
  const { kms, dataDir } = await openKms(t, { poolSize: 2 });
  for (let round = 0; round < 8; round++) {
    const [created] = await Promise.all([
      Promise.all(Array.from({ length: 8 }, (_, i) => kms.createDekForThread(`race-${round}-${i}`))),
      kms.rotateKek(),
    ]);
    const { kekVersions } = await kms.rotationStatus();
    for (const dek of created) {
      // A key made mid-rotation under the old version was rewrapped by it: ask for its current.
      const { kekVersion } = await kms.getWrappedDek(dek.keyId);
      t.true(kekVersions.includes(kekVersion), `key ${dek.keyId} is under a live KEK version`);
      const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from('after the race'));
      t.deepEqual(await kms.decrypt(dek.keyId, ciphertext), Buffer.from('after the race'));
    }
  }
  // The audit log stays exact: a key made and then discarded (never stored) says so.
  const creates = fs
    .readFileSync(path.join(dataDir, 'kms-audit.log'), 'utf8')
    .split('\n')
    .filter((line) => line.includes('"op":"create_dek_for_thread"'))
    .map((line) => JSON.parse(line) as { key_id: string; detail?: string });
  const discarded = new Set(creates.filter((c) => c.detail?.startsWith('discarded')).map((c) => c.key_id));
  for (const keyId of new Set(creates.map((c) => c.key_id))) {
    if (discarded.has(keyId)) await expectCode(t, kms.getWrappedDek(keyId), 'KEY_NOT_FOUND');
    else t.is((await kms.getWrappedDek(keyId)).keyId, keyId);
  }
  t.log(`${discarded.size} keys made again after a rotation retired their KEK version`);
});
