/**
 * Embedded KMS: encrypt/decrypt round trips, batch forms, bad input and DEK creation races.
 */
import { randomBytes } from 'node:crypto';
import test from 'ava';
import { UserError } from '../src/errors.js';
import {
  CIPHERS,
  CIPHERTEXT_HEADER_BYTES,
  type CipherName,
  ciphertextLead,
  ciphertextOverhead,
  FORMAT_XCHACHA20_POLY1305,
  MAX_CIPHERTEXT_OVERHEAD,
  nonceBytes,
  TAG_BYTES,
} from '../src/format.js';
import { MAX_PLAINTEXT_BYTES } from '../src/kms/index.js';
import { expectCode, openKms } from './helpers/kms.js';

/** The default cipher's figures: what these tests' KMSs write. */
const CIPHERTEXT_OVERHEAD = ciphertextOverhead(FORMAT_XCHACHA20_POLY1305);
const NONCE_BYTES = nonceBytes(FORMAT_XCHACHA20_POLY1305);

test('round trips with and without AAD, empty plaintext, fresh nonce, key version', async (t) => {
  const { kms } = await openKms(t);
  const dek = await kms.createDekForThread('thread-rt');
  t.is(dek.threadId, 'thread-rt');
  t.is(dek.keyVersion, 1);
  const plaintext = Buffer.from('hello, envelope');
  const aad = Buffer.from('thread-rt/m1');

  const plain = await kms.encrypt(dek.keyId, plaintext);
  t.is(plain.keyVersion, dek.keyVersion);
  t.is(plain.ciphertext.length, plaintext.length + CIPHERTEXT_OVERHEAD);
  t.false(plain.ciphertext.includes(plaintext));
  t.deepEqual(await kms.decrypt(dek.keyId, plain.ciphertext), plaintext);

  const bound = await kms.encrypt(dek.keyId, plaintext, aad);
  t.deepEqual(await kms.decrypt(dek.keyId, bound.ciphertext, aad), plaintext);

  // A Uint8Array that is not a Buffer works too.
  const u8 = new Uint8Array([1, 2, 3, 250]);
  const fromU8 = await kms.encrypt(dek.keyId, u8, new Uint8Array([9]));
  t.deepEqual(new Uint8Array(await kms.decrypt(dek.keyId, fromU8.ciphertext, new Uint8Array([9]))), u8);

  const empty = await kms.encrypt(dek.keyId, Buffer.alloc(0), aad);
  t.is(empty.ciphertext.length, CIPHERTEXT_OVERHEAD);
  t.is((await kms.decrypt(dek.keyId, empty.ciphertext, aad)).length, 0);

  // Same plaintext, key and AAD: every ciphertext differs (fresh random nonce each time).
  const again = await Promise.all(Array.from({ length: 20 }, () => kms.encrypt(dek.keyId, plaintext, aad)));
  const nonces = new Set(
    [bound, ...again].map((r) =>
      r.ciphertext.subarray(CIPHERTEXT_HEADER_BYTES, CIPHERTEXT_HEADER_BYTES + NONCE_BYTES).toString('hex'),
    ),
  );
  t.is(nonces.size, 21);
  t.is(new Set([bound, ...again].map((r) => r.ciphertext.toString('hex'))).size, 21);
  for (const r of again) t.deepEqual(await kms.decrypt(dek.keyId, r.ciphertext, aad), plaintext);
});

test('8 MiB plaintext round trips; MAX_PLAINTEXT_BYTES + 1 is PAYLOAD_TOO_LARGE', async (t) => {
  const { kms } = await openKms(t);
  const dek = await kms.createDekForThread('thread-big');
  const big = randomBytes(8 * 1024 * 1024);
  const { ciphertext } = await kms.encrypt(dek.keyId, big);
  t.is(ciphertext.length, big.length + CIPHERTEXT_OVERHEAD);
  t.true((await kms.decrypt(dek.keyId, ciphertext)).equals(big));

  const tooBig = Buffer.alloc(MAX_PLAINTEXT_BYTES + 1);
  await expectCode(t, kms.encrypt(dek.keyId, tooBig), 'PAYLOAD_TOO_LARGE');
  const [item] = await kms.encryptBatch([{ keyId: dek.keyId, plaintext: tooBig }]);
  t.false(item!.ok);
  t.is(!item!.ok && item!.error.code, 'PAYLOAD_TOO_LARGE');
  // A ciphertext longer than any we could have made is refused the same way.
  const tooLongCiphertext = Buffer.alloc(MAX_PLAINTEXT_BYTES + MAX_CIPHERTEXT_OVERHEAD + 1);
  await expectCode(t, kms.decrypt(dek.keyId, tooLongCiphertext), 'PAYLOAD_TOO_LARGE');
  // The KMS still works afterwards.
  t.deepEqual(
    await kms.decrypt(dek.keyId, (await kms.encrypt(dek.keyId, Buffer.from('ok'))).ciphertext),
    Buffer.from('ok'),
  );
});

test('batch forms keep request order with per-item results and errors', async (t) => {
  const { kms } = await openKms(t);
  const a = await kms.createDekForThread('thread-a');
  const b = await kms.createDekForThread('thread-b');
  const items = Array.from({ length: 150 }, (_, i) => {
    if (i % 10 === 3) return { keyId: 'dek_missing', plaintext: Buffer.from(`m${i}`) };
    if (i % 10 === 7) return { keyId: a.keyId, plaintext: `not bytes ${i}` as unknown as Uint8Array };
    return {
      keyId: i % 2 === 0 ? a.keyId : b.keyId,
      plaintext: Buffer.from(`message ${i}`),
      aad: Buffer.from(`aad ${i}`),
    };
  });
  const encrypted = await kms.encryptBatch(items);
  t.is(encrypted.length, items.length);
  encrypted.forEach((r, i) => {
    if (i % 10 === 3) t.like(r, { ok: false, error: { code: 'KEY_NOT_FOUND', status: 404 } });
    else if (i % 10 === 7) t.like(r, { ok: false, error: { code: 'INVALID_INPUT', status: 400 } });
    else t.true(r.ok, `item ${i}`);
  });

  const decryptItems = encrypted.map((r, i) => {
    const keyId = items[i]!.keyId;
    if (!r.ok) return { keyId: a.keyId, ciphertext: Buffer.from('garbage') };
    // Every fifth good item gets the wrong AAD.
    const aad = i % 5 === 0 ? Buffer.from('wrong') : items[i]!.aad;
    return { keyId, ciphertext: r.value.ciphertext, aad };
  });
  const decrypted = await kms.decryptBatch(decryptItems);
  t.is(decrypted.length, items.length);
  decrypted.forEach((r, i) => {
    if (!encrypted[i]!.ok || i % 5 === 0)
      t.like(r, { ok: false, error: { code: 'DECRYPT_FAILED' } }, `item ${i}`);
    else t.deepEqual(r, { ok: true, value: Buffer.from(`message ${i}`) }, `item ${i}`);
  });
  for (const r of [...encrypted, ...decrypted]) if (!r.ok) t.true(r.error instanceof UserError);

  t.deepEqual(await kms.encryptBatch([]), []);
  await expectCode(t, kms.encryptBatch('nope' as unknown as []), 'INVALID_INPUT');
  const [nullItem] = await kms.decryptBatch([null as unknown as { keyId: string; ciphertext: Uint8Array }]);
  t.like(nullItem, { ok: false, error: { code: 'INVALID_INPUT' } });
});

for (const cipher of Object.keys(CIPHERS) as CipherName[]) {
  test(`tampering with any part of a ciphertext, wrong AAD or another key: DECRYPT_FAILED (${cipher})`, async (t) => {
    const { kms } = await openKms(t, { cipher });
    const format = CIPHERS[cipher];
    const dek = await kms.createDekForThread('thread-tamper');
    const other = await kms.createDekForThread('thread-other');
    const aad = Buffer.from('thread-tamper/m1');
    const plaintext = Buffer.from('a secret that must not be altered');
    const { ciphertext } = await kms.encrypt(dek.keyId, plaintext, aad);
    const { ciphertext: plainCt } = await kms.encrypt(dek.keyId, plaintext);

    t.is(ciphertext[0], format, 'written in the configured format');
    t.is(ciphertext.length, plaintext.length + ciphertextOverhead(format));
    const body = ciphertextLead(format);
    const positions: Record<string, number> = {
      'header format byte': 0,
      'header version byte': 4,
      nonce: CIPHERTEXT_HEADER_BYTES + 3,
      body: body + 5,
      tag: ciphertext.length - TAG_BYTES + 7,
      'last tag byte': ciphertext.length - 1,
    };
    for (const [what, at] of Object.entries(positions)) {
      for (const bit of [0, 7]) {
        const bad = Buffer.from(ciphertext);
        bad[at]! ^= 1 << bit;
        const err = await expectCode(
          t,
          kms.decrypt(dek.keyId, bad, aad),
          'DECRYPT_FAILED',
          `${what} bit ${bit}`,
        );
        t.true(err instanceof UserError);
      }
    }
    // The version field pointing at another (unknown) DEK version.
    const otherVersion = Buffer.from(ciphertext);
    otherVersion.writeUInt32BE(2, 1);
    await expectCode(t, kms.decrypt(dek.keyId, otherVersion, aad), 'DECRYPT_FAILED');
    // The format byte claiming the other cipher: read as that layout, it fails to authenticate.
    const otherFormat = Buffer.from(ciphertext);
    otherFormat[0] = format === FORMAT_XCHACHA20_POLY1305 ? 0x01 : 0x02;
    await expectCode(t, kms.decrypt(dek.keyId, otherFormat, aad), 'DECRYPT_FAILED', 'other format byte');

    await expectCode(
      t,
      kms.decrypt(dek.keyId, ciphertext, Buffer.from('thread-tamper/m2')),
      'DECRYPT_FAILED',
    );
    await expectCode(t, kms.decrypt(dek.keyId, ciphertext), 'DECRYPT_FAILED', 'AAD used but not given');
    await expectCode(t, kms.decrypt(dek.keyId, ciphertext, Buffer.alloc(0)), 'DECRYPT_FAILED', 'empty AAD');
    await expectCode(t, kms.decrypt(dek.keyId, plainCt, aad), 'DECRYPT_FAILED', 'AAD given but not used');
    await expectCode(t, kms.decrypt(other.keyId, ciphertext, aad), 'DECRYPT_FAILED', "another thread's key");
    await expectCode(t, kms.reencrypt(other.keyId, ciphertext, aad), 'DECRYPT_FAILED');

    // Every truncation of a real ciphertext fails cleanly, single and batched.
    const short = (await kms.encrypt(dek.keyId, Buffer.from('0123456789'), aad)).ciphertext;
    const longest = short.length + 1;
    const cut = (len: number) =>
      len > short.length ? Buffer.concat([short, Buffer.alloc(1)]) : short.subarray(0, len);
    for (let len = 0; len <= longest; len++) {
      if (len === short.length) continue;
      await expectCode(t, kms.decrypt(dek.keyId, cut(len), aad), 'DECRYPT_FAILED', `length ${len}`);
    }
    const truncated = await kms.decryptBatch(
      Array.from({ length: longest + 1 }, (_, len) => ({ keyId: dek.keyId, ciphertext: cut(len), aad })),
    );
    truncated.forEach((r, len) => {
      if (len === short.length) t.deepEqual(r, { ok: true, value: Buffer.from('0123456789') });
      else t.like(r, { ok: false, error: { code: 'DECRYPT_FAILED' } }, `length ${len}`);
    });

    // Nothing was disturbed by the failures.
    t.deepEqual(await kms.decrypt(dek.keyId, ciphertext, aad), plaintext);
    t.deepEqual(await kms.decrypt(dek.keyId, plainCt), plaintext);
    t.deepEqual(await kms.decrypt(dek.keyId, short, aad), Buffer.from('0123456789'));
    t.true((await kms.health()).ok);
  });
}

test('unknown keys are KEY_NOT_FOUND and malformed arguments INVALID_INPUT; stored data unchanged', async (t) => {
  const { kms } = await openKms(t);
  const dek = await kms.createDekForThread('thread-input');
  const aad = Buffer.from('aad');
  const earlier = await kms.encrypt(dek.keyId, Buffer.from('before the failures'), aad);
  const wrappedBefore = (await kms.getWrappedDek(dek.keyId)).wrapped;
  const longId = 'k'.repeat(257);

  for (const keyId of ['dek_unknown', `${dek.keyId}x`, 'k'.repeat(256)]) {
    const err = await expectCode(t, kms.encrypt(keyId, Buffer.from('x')), 'KEY_NOT_FOUND');
    t.true(err instanceof UserError);
    await expectCode(t, kms.decrypt(keyId, earlier.ciphertext, aad), 'KEY_NOT_FOUND');
    await expectCode(t, kms.getWrappedDek(keyId), 'KEY_NOT_FOUND');
    await expectCode(t, kms.reencrypt(keyId, earlier.ciphertext, aad), 'KEY_NOT_FOUND');
    await expectCode(t, kms.rewrapDek(keyId), 'KEY_NOT_FOUND');
    await expectCode(t, kms.rotateDek(keyId), 'KEY_NOT_FOUND');
    await expectCode(t, kms.destroyDek(keyId), 'KEY_NOT_FOUND');
    await expectCode(t, kms.destroyDekVersionsBefore(keyId, 1), 'KEY_NOT_FOUND');
  }

  const badIds: unknown[] = [42, null, undefined, '', longId, { id: dek.keyId }, Buffer.from(dek.keyId)];
  for (const keyId of badIds) {
    const label = `key id ${typeof keyId} ${String(keyId).slice(0, 20)}`;
    await expectCode(t, kms.encrypt(keyId as string, Buffer.from('x')), 'INVALID_INPUT', label);
    await expectCode(t, kms.decrypt(keyId as string, earlier.ciphertext), 'INVALID_INPUT', label);
    await expectCode(t, kms.getWrappedDek(keyId as string), 'INVALID_INPUT', label);
    await expectCode(t, kms.rewrapDek(keyId as string), 'INVALID_INPUT', label);
    await expectCode(t, kms.destroyDek(keyId as string), 'INVALID_INPUT', label);
    await expectCode(t, kms.createDekForThread(keyId as string), 'INVALID_INPUT', `thread ${label}`);
  }
  const badBytes: unknown[] = [
    'plain string',
    123,
    null,
    undefined,
    [1, 2, 3],
    new ArrayBuffer(4),
    { length: 2 },
  ];
  for (const value of badBytes) {
    const label = `bytes ${Object.prototype.toString.call(value)}`;
    await expectCode(t, kms.encrypt(dek.keyId, value as Uint8Array), 'INVALID_INPUT', label);
    await expectCode(t, kms.decrypt(dek.keyId, value as Uint8Array), 'INVALID_INPUT', label);
    if (value !== null && value !== undefined) {
      await expectCode(
        t,
        kms.encrypt(dek.keyId, Buffer.from('x'), value as Uint8Array),
        'INVALID_INPUT',
        `aad ${label}`,
      );
    }
  }
  await expectCode(
    t,
    kms.encrypt(dek.keyId, Buffer.from('x'), Buffer.alloc(64 * 1024 + 1)),
    'PAYLOAD_TOO_LARGE',
  );
  await expectCode(t, kms.destroyDekVersionsBefore(dek.keyId, 0), 'INVALID_INPUT');
  await expectCode(t, kms.destroyDekVersionsBefore(dek.keyId, 1.5), 'INVALID_INPUT');
  await expectCode(
    t,
    kms.destroyDekVersionsBefore(dek.keyId, 2),
    'INVALID_INPUT',
    'above the current version',
  );

  // Nothing stored changed: the key, its wrapping and earlier ciphertexts are as before.
  const after = await kms.getWrappedDek(dek.keyId);
  t.deepEqual(after.wrapped, wrappedBefore);
  t.is(after.keyVersion, 1);
  t.deepEqual(await kms.decrypt(dek.keyId, earlier.ciphertext, aad), Buffer.from('before the failures'));
  t.is((await kms.health()).dekCount, 1);
  t.is((await kms.createDekForThread('thread-input')).keyId, dek.keyId);
});

test('createDekForThread is idempotent: repeats, 50 concurrent calls and a restart give one key', async (t) => {
  const fixture = await openKms(t, { poolSize: 2 });
  const { kms } = fixture;
  const first = await kms.createDekForThread('thread-one');
  const again = await kms.createDekForThread('thread-one');
  t.is(again.keyId, first.keyId);
  t.deepEqual(again.wrapped, first.wrapped);
  t.is((await kms.getWrappedDek(first.keyId)).threadId, 'thread-one');

  const racing = await Promise.all(Array.from({ length: 50 }, () => kms.createDekForThread('thread-race')));
  t.is(new Set(racing.map((d) => d.keyId)).size, 1);
  // Many threads at once: one key each, all distinct.
  const many = await Promise.all(
    Array.from({ length: 60 }, (_, i) => kms.createDekForThread(`thread-many-${i % 20}`)),
  );
  const perThread = new Map<string, Set<string>>();
  for (const d of many) perThread.set(d.threadId, (perThread.get(d.threadId) ?? new Set()).add(d.keyId));
  t.is(perThread.size, 20);
  for (const ids of perThread.values()) t.is(ids.size, 1);
  t.is(new Set(many.map((d) => d.keyId)).size, 20);
  t.is((await kms.health()).dekCount, 22);

  const { ciphertext } = await kms.encrypt(racing[0]!.keyId, Buffer.from('survives restart'));
  await kms.close();
  const reopened = await fixture.reopen();
  t.is((await reopened.createDekForThread('thread-one')).keyId, first.keyId);
  t.is((await reopened.createDekForThread('thread-race')).keyId, racing[0]!.keyId);
  t.deepEqual(await reopened.decrypt(racing[0]!.keyId, ciphertext), Buffer.from('survives restart'));
  t.is((await reopened.health()).dekCount, 22);
});
