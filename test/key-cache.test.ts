/**
 * The workers' key cache (workers/key-cache.ts): a holder that keeps a cache entry (a key
 * directory entry does) gets its key only while the key is still cached, never a slot that was
 * zeroed and may now hold another key.
 */
import test from 'ava';
import { KeyArena } from '../workers/key-arena.js';
import { KeyCache } from '../workers/key-cache.js';

function keyOf(arena: KeyArena, fill: number): Buffer {
  const key = arena.alloc();
  key.fill(fill);
  return key;
}

test('a kept entry serves its key until the key is evicted, replaced, deleted or cleared', (t) => {
  const arena = new KeyArena(8);
  const cache = new KeyCache(2, arena);
  const a = cache.set(0, keyOf(arena, 1), 'a');
  t.is(cache.use(a)?.[0], 1, 'a kept entry serves its key');
  cache.set(1, keyOf(arena, 2), 'b');
  // a was used since it was cached (second chance), so c's arrival evicts b.
  const c = cache.set(2, keyOf(arena, 3), 'c');
  t.is(cache.use(a)?.[0], 1);
  t.is(cache.lookup(1), undefined, 'b was evicted');

  const replaced = cache.set(0, keyOf(arena, 4), 'a');
  t.is(cache.use(a), undefined, 'the entry of a replaced key is dead');
  t.is(cache.use(replaced)?.[0], 4);

  cache.deleteKey('c');
  t.is(cache.use(c), undefined, 'a deleted key is not served');
  cache.clear();
  t.is(cache.use(replaced), undefined, 'nor a cleared one');
});

test('an entry looked up under another tag (a reused directory entry) is not served', (t) => {
  const arena = new KeyArena(4);
  const cache = new KeyCache(4, arena);
  cache.set(7, keyOf(arena, 1), 'a', 1);
  t.is(cache.lookup(7, 2), undefined);
  t.is(cache.lookup(7, 1)?.key[0], 1);
});
