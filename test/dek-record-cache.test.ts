/**
 * The registry's cache of decoded DEK records: bounded, and a record in use outlives one that is
 * not (second chance), so a few busy threads keep their records among thousands of idle ones.
 */
import test from 'ava';
import type { DekRecord } from '../src/kms/dek-versions.js';
import { DekRecordCache } from '../src/kms/registry/dek-cache.js';

const record = (keyId: string) => ({ keyId }) as unknown as DekRecord;

test('bounded: past capacity a record not used since the hand last passed is dropped, a used one stays', (t) => {
  const cache = new DekRecordCache(3);
  for (const id of ['a', 'b', 'c']) cache.set(id, record(id));
  t.is(cache.size, 3);
  t.is(cache.get('a')?.keyId, 'a', 'a is in use');
  cache.set('d', record('d'));
  t.is(cache.size, 3);
  t.is(cache.get('a')?.keyId, 'a', 'the busy record was given a second chance');
  t.is(cache.get('b'), undefined, 'the idle one went');
  // Reading a record again keeps it however many others come and go.
  for (let i = 0; i < 20; i++) {
    t.truthy(cache.get('a'));
    cache.set(`x${i}`, record(`x${i}`));
  }
  t.is(cache.get('a')?.keyId, 'a');
  t.is(cache.size, 3);
});

test('set replaces in place; delete and clear drop entries and free their slots', (t) => {
  const cache = new DekRecordCache(2);
  const first = record('a');
  const second = record('a');
  cache.set('a', first);
  cache.set('a', second);
  t.is(cache.get('a'), second);
  t.is(cache.size, 1);
  cache.set('b', record('b'));
  cache.delete('a');
  t.is(cache.get('a'), undefined);
  cache.set('c', record('c'));
  t.is(cache.size, 2);
  t.truthy(cache.get('b'), 'the deleted slot was reused, not b');
  cache.clear();
  t.is(cache.size, 0);
  t.is(cache.get('b'), undefined);
  cache.set('d', record('d'));
  t.is(cache.get('d')?.keyId, 'd');
});
