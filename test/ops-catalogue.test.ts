/**
 * The operation catalogue (src/ops/): the bridge op codes and HTTP routes are wire contracts, so
 * they are pinned here; the derived maps must agree with the list.
 */
import test from 'ava';
import { IDEMPOTENT_OPS, OP_BY_CODE, OP_BY_NAME, OP_CODES, OPS, REPEATABLE_OPS } from '../src/ops/index.js';

test('bridge op codes never change', (t) => {
  t.deepEqual(
    { ...OP_CODES },
    {
      create_dek_for_thread: 0x01,
      get_wrapped: 0x02,
      encrypt: 0x03,
      decrypt: 0x04,
      reencrypt: 0x05,
      rewrap: 0x06,
      rotate_dek: 0x07,
      destroy_dek_versions_before: 0x08,
      destroy_dek: 0x09,
      rotate_kek: 0x0a,
      rotation_status: 0x0b,
      health: 0x0c,
      reencrypt_batch: 0x0d,
      cancel_deletion: 0x0e,
    },
  );
  for (const op of OPS) {
    t.is(OP_BY_CODE.get(op.code), op);
    t.is(OP_BY_NAME[op.name], op);
  }
});

test('every op has its own HTTP method and path, or shares that of its batch form', (t) => {
  const own = OPS.filter((op) => op.http.sharedRoute !== true);
  const routes = own.map((op) => `${op.http.method} ${op.http.path}`);
  t.is(new Set(routes).size, own.length);
  t.true(routes.includes('GET /rotate_kek') && routes.includes('POST /rotate_kek'));
  for (const op of OPS.filter((o) => o.http.sharedRoute === true)) {
    t.true(
      OPS.some((o) => o.batch && o.http.method === op.http.method && o.http.path === op.http.path),
      op.name,
    );
  }
});

test('the idempotent ops', (t) => {
  t.deepEqual([...IDEMPOTENT_OPS].sort(), [
    'create_dek_for_thread',
    'decrypt',
    'get_wrapped',
    'health',
    'rewrap',
    'rotation_status',
  ]);
});

test('the ops repeated after an unknown outcome: the idempotent ones and those that store nothing', (t) => {
  t.deepEqual(
    [...REPEATABLE_OPS].sort(),
    [...IDEMPOTENT_OPS, 'encrypt', 'reencrypt', 'reencrypt_batch'].sort(),
  );
});
