/**
 * The worker's AEAD layer, both formats: XChaCha20-Poly1305 against the published test vector,
 * ciphertext and wrapped-key layouts, tampering and identity swaps; and the locked key arena and
 * key cache at their full size.
 */
import fs from 'node:fs';
import test from 'ava';
import {
  CIPHERS,
  type CipherName,
  ciphertextLead,
  ciphertextOverhead,
  dekIdentity,
  FORMAT_XCHACHA20_POLY1305,
  KEY_BYTES,
  MAX_CIPHERTEXT_LEAD,
  WRAP_KIND_DEK,
  WRAP_KIND_KEK,
  wrappedKeyBytes,
} from '../src/format.js';
import {
  AuthFailure,
  openInto,
  randomKeyInto,
  sealInto,
  unwrapKeyInto,
  wrapKeyInto,
  xchachaOpen,
  xchachaSeal,
} from '../workers/aead.js';
import { KeyArena, RESERVE_SLOTS } from '../workers/key-arena.js';
import { KeyCache } from '../workers/key-cache.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

test('XChaCha20-Poly1305 matches draft-irtf-cfrg-xchacha-03 A.3.1, and opens it back', (t) => {
  const key = hex('808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f');
  const nonce = hex('404142434445464748494a4b4c4d4e4f5051525354555657');
  const aad = hex('50515253c0c1c2c3c4c5c6c7');
  const plaintext = Buffer.from(
    "Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.",
  );
  const expected = hex(`bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb
    731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452
    2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9
    21f9664c97637da9768812f615c68b13b52e c0875924c1c7987947deafd8780acf49`);
  const sealed = Buffer.alloc(plaintext.length + 16);
  xchachaSeal(key, nonce, aad, plaintext, sealed);
  t.deepEqual(sealed, expected);
  const opened = Buffer.alloc(plaintext.length);
  xchachaOpen(key, nonce, aad, sealed, opened);
  t.deepEqual(opened, plaintext);
  sealed[3]! ^= 1;
  const untouched = Buffer.alloc(plaintext.length);
  t.throws(() => xchachaOpen(key, nonce, aad, sealed, untouched), { instanceOf: AuthFailure });
  t.true(
    untouched.every((b) => b === 0),
    'nothing is written when the tag fails',
  );
});

function randomKey(): Buffer {
  const key = Buffer.alloc(KEY_BYTES);
  randomKeyInto(key);
  return key;
}

for (const cipher of Object.keys(CIPHERS) as CipherName[]) {
  const format = CIPHERS[cipher];

  test(`${cipher}: a ciphertext's layout, in place from an encrypt slot, and out of place`, (t) => {
    const key = randomKey();
    // Longer than the lead, so that a decrypt's output overlaps its own ciphertext.
    const plaintext = Buffer.from('the quick brown fox jumps over the lazy dog '.repeat(3));
    const aad = Buffer.from('thread/message');
    // The encrypt slot layout: plaintext after MAX_CIPHERTEXT_LEAD bytes, output from the start.
    const slot = Buffer.alloc(MAX_CIPHERTEXT_LEAD + plaintext.length + 16);
    plaintext.copy(slot, MAX_CIPHERTEXT_LEAD);
    const input = slot.subarray(MAX_CIPHERTEXT_LEAD, MAX_CIPHERTEXT_LEAD + plaintext.length);
    const length = sealInto(format, key, 7, input, aad, slot, 0);
    t.is(length, plaintext.length + ciphertextOverhead(format));
    const ciphertext = Buffer.from(slot.subarray(0, length));
    t.is(ciphertext[0], format);
    t.is(ciphertext.readUInt32BE(1), 7);
    t.false(ciphertext.includes(plaintext));

    // Decrypt in place (output over its own input, as the worker does) and into another buffer.
    const inPlace = Buffer.from(ciphertext);
    t.is(openInto(key, inPlace, aad, inPlace, 0), plaintext.length);
    t.deepEqual(inPlace.subarray(0, plaintext.length), plaintext);
    t.false(inPlace.subarray(plaintext.length).includes(plaintext.subarray(-12)), 'no plaintext left behind');
    const out = Buffer.alloc(length);
    t.is(openInto(key, ciphertext, aad, out, 3), plaintext.length);
    t.deepEqual(out.subarray(3, 3 + plaintext.length), plaintext);

    const lead = ciphertextLead(format);
    for (const at of [0, 1, 4, 5, lead - 1, lead, length - 1]) {
      const bad = Buffer.from(ciphertext);
      bad[at]! ^= 0x40;
      t.throws(
        () => openInto(key, bad, aad, Buffer.alloc(length), 0),
        { instanceOf: AuthFailure },
        `byte ${at}`,
      );
    }
    t.throws(() => openInto(key, ciphertext, Buffer.from('thread/other'), out, 0), {
      instanceOf: AuthFailure,
    });
    t.throws(() => openInto(key, ciphertext, null, out, 0), { instanceOf: AuthFailure });
    t.throws(() => openInto(randomKey(), ciphertext, aad, out, 0), { instanceOf: AuthFailure });
  });

  test(`${cipher}: a wrapped key binds its kind, wrapping version and identity`, (t) => {
    const kek = randomKey();
    const dek = randomKey();
    const identity = dekIdentity('dek_a', 1);
    const wrapped = Buffer.alloc(wrappedKeyBytes(format));
    t.is(wrapKeyInto(format, kek, WRAP_KIND_DEK, 3, identity, dek, wrapped, 0), wrapped.length);
    t.is(wrapped[0], format);
    t.false(wrapped.includes(dek));
    const into = Buffer.alloc(KEY_BYTES);
    unwrapKeyInto(kek, WRAP_KIND_DEK, 3, identity, wrapped, into);
    t.deepEqual(into, dek);

    const refused = (what: string, f: () => void) => t.throws(f, { instanceOf: AuthFailure }, what);
    refused('another identity', () =>
      unwrapKeyInto(kek, WRAP_KIND_DEK, 3, dekIdentity('dek_b', 1), wrapped, into),
    );
    refused('another version', () =>
      unwrapKeyInto(kek, WRAP_KIND_DEK, 3, dekIdentity('dek_a', 2), wrapped, into),
    );
    refused('another kind', () => unwrapKeyInto(kek, WRAP_KIND_KEK, 3, identity, wrapped, into));
    refused('another wrapping version', () => unwrapKeyInto(kek, WRAP_KIND_DEK, 4, identity, wrapped, into));
    refused('another KEK', () => unwrapKeyInto(randomKey(), WRAP_KIND_DEK, 3, identity, wrapped, into));
    refused('truncated', () => unwrapKeyInto(kek, WRAP_KIND_DEK, 3, identity, wrapped.subarray(1), into));
    for (let at = 0; at < wrapped.length; at += 5) {
      const bad = Buffer.from(wrapped);
      bad[at]! ^= 1;
      refused(`byte ${at}`, () => unwrapKeyInto(kek, WRAP_KIND_DEK, 3, identity, bad, into));
    }
  });
}

test('a format-1 wrapped key rewraps into format 2 and the key is the same', (t) => {
  const kek = randomKey();
  const dek = randomKey();
  const identity = dekIdentity('dek_x', 2);
  const v1 = Buffer.alloc(wrappedKeyBytes(CIPHERS['aes-256-gcm']));
  wrapKeyInto(CIPHERS['aes-256-gcm'], kek, WRAP_KIND_DEK, 1, identity, dek, v1, 0);
  const opened = Buffer.alloc(KEY_BYTES);
  unwrapKeyInto(kek, WRAP_KIND_DEK, 1, identity, v1, opened);
  const v2 = Buffer.alloc(wrappedKeyBytes(FORMAT_XCHACHA20_POLY1305));
  wrapKeyInto(FORMAT_XCHACHA20_POLY1305, kek, WRAP_KIND_DEK, 2, identity, opened, v2, 0);
  const back = Buffer.alloc(KEY_BYTES);
  unwrapKeyInto(kek, WRAP_KIND_DEK, 2, identity, v2, back);
  t.deepEqual(back, dek);
  t.is(v2.length - v1.length, 12, 'a 24-byte nonce instead of 12');
});

function mapCount(): number {
  return fs.readFileSync('/proc/self/maps', 'latin1').split('\n').length;
}

test('the key cache at full size: 100,000 keys in one locked arena, a handful of mappings, zeroed on eviction', (t) => {
  const capacity = 100_000;
  const mapsBefore = mapCount();
  const arena = new KeyArena(capacity + RESERVE_SLOTS);
  t.true(mapCount() - mapsBefore <= 4, 'one region (and its guard pages) for every slot');
  const cache = new KeyCache(capacity, arena);
  const first = arena.alloc();
  first.fill(0xab);
  cache.set('k0', first, 'k0');
  for (let i = 1; i < capacity; i++) {
    const key = arena.alloc();
    key.writeUInt32BE(i + 1, 0);
    cache.set(`k${i}`, key, `k${i}`);
  }
  t.is(cache.size, capacity);
  // sodium_malloc per key would have mapped ~3 regions per key (and aborted near 20,000 keys); what
  // grows here is the JS heap holding the cache's entries.
  t.true(mapCount() - mapsBefore < 1000, `${mapCount() - mapsBefore} new mappings`);
  const status = arena.status();
  t.is(status.lockedBytes + status.unlockedBytes, (capacity + RESERVE_SLOTS) * KEY_BYTES);
  t.true(first.buffer.byteLength >= capacity * KEY_BYTES, 'each key is a view of the one arena');

  // Past capacity the oldest unreferenced key is evicted and its slot zeroed.
  cache.set('k-new', arena.alloc(), 'k-new');
  t.is(cache.size, capacity);
  t.is(cache.get('k0'), undefined);
  t.true(
    first.every((b) => b === 0),
    'the evicted key was zeroed in place',
  );
  t.is(cache.get('k1')?.readUInt32BE(0), 2, 'the others are intact');
  cache.clear();
  t.is(cache.size, 0);
});

test('keys used by the running task are pinned: eviction never zeroes one a later op of the batch needs', (t) => {
  const arena = new KeyArena(8);
  const cache = new KeyCache(2, arena);
  cache.beginTask();
  const held: Buffer[] = [];
  for (let i = 0; i < 6; i++) {
    const key = arena.alloc();
    key.fill(i + 1);
    cache.set(`k${i}`, key, `k${i}`);
    held.push(key);
  }
  // A tiny cache held all six while the task ran, each intact (and the arena grew past its size).
  for (const [i, key] of held.entries()) {
    t.true(
      key.every((b) => b === i + 1),
      `key ${i} intact during the task`,
    );
  }
  t.is(cache.size, 6);
  cache.endTask();
  t.is(cache.size, 2, 'trimmed to capacity when the task ends');
  t.is(held.filter((key) => key.every((b) => b === 0)).length, 4, 'and the evicted ones zeroed');
});
