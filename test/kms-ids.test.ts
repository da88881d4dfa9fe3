/**
 * Key and thread ids are validated before any registry lookup: ids longer than LMDB's key limit
 * (~2 KB), or holding control characters, are INVALID_INPUT through the library and over the
 * bridge, never an INTERNAL from inside LMDB.
 */
import test from 'ava';
import type { Kms } from '../src/api/index.js';
import type { KmsRequest } from '../src/ops/index.js';
import { decodeError, decodeResult, encodeRequest, FRAME_ERROR } from '../src/wire/bridge-codec.js';
import { auditLines, expectCode, openKms } from './helpers/kms.js';
import { BridgeSocket, spawnDaemon } from './helpers/kms-daemon.js';

const BAD_IDS: Record<string, string> = {
  '2 KB id': 'k'.repeat(2048),
  '600 KB id': 'k'.repeat(600 * 1024),
  'id with NUL': 'dek_\u0000x',
  'id with a newline': 'dek_a\nb',
};

/** Every Kms method that takes a key or thread id, called with `id`. */
function callsWith(kms: Kms, id: string, ciphertext: Uint8Array): Record<string, () => Promise<unknown>> {
  return {
    getWrappedDek: () => kms.getWrappedDek(id),
    encrypt: () => kms.encrypt(id, Buffer.from('x')),
    decrypt: () => kms.decrypt(id, ciphertext),
    reencrypt: () => kms.reencrypt(id, ciphertext),
    rewrapDek: () => kms.rewrapDek(id),
    rotateDek: () => kms.rotateDek(id),
    destroyDek: () => kms.destroyDek(id),
    destroyDekVersionsBefore: () => kms.destroyDekVersionsBefore(id, 1),
    createDekForThread: () => kms.createDekForThread(id),
    encryptBatch: async () => {
      const [r] = await kms.encryptBatch([{ keyId: id, plaintext: Buffer.from('x') }]);
      if (!r!.ok) throw r!.error;
    },
    decryptBatch: async () => {
      const [r] = await kms.decryptBatch([{ keyId: id, ciphertext }]);
      if (!r!.ok) throw r!.error;
    },
  };
}

test('library: over-long and control-character ids are INVALID_INPUT on every method', async (t) => {
  const { kms, dataDir } = await openKms(t);
  const dek = await kms.createDekForThread('ids-thread');
  const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from('hello'));
  for (const [what, id] of Object.entries(BAD_IDS)) {
    for (const [method, call] of Object.entries(callsWith(kms, id, ciphertext))) {
      await expectCode(t, call(), 'INVALID_INPUT', `${method}: ${what}`);
    }
  }
  // The refused ids are not copied into the audit log, and the KMS still works.
  t.false(auditLines(dataDir).some((line) => (line.key_id ?? '').length > 256));
  t.is((await kms.decrypt(dek.keyId, ciphertext)).toString(), 'hello');
});

test('bridge: 2 KB and 600 KB ids are INVALID_INPUT, and the connection stays usable', async (t) => {
  const daemon = await spawnDaemon({ bridgePort: 0 });
  t.teardown(() => daemon.kill9());
  const conn = new BridgeSocket(daemon.bridgePort!);
  t.teardown(() => conn.destroy());
  let id = 1;
  for (const big of [BAD_IDS['2 KB id']!, BAD_IDS['600 KB id']!]) {
    const requests: KmsRequest[] = [
      { op: 'get_wrapped', keyId: big },
      { op: 'create_dek_for_thread', threadId: big },
      { op: 'rotate_dek', keyId: big },
      { op: 'destroy_dek', keyId: big },
    ];
    for (const req of requests) {
      conn.write(encodeRequest(id, req));
      const answer = await conn.answer(id++);
      t.is(answer.type, FRAME_ERROR, `${req.op} ${big.length}`);
      t.is(decodeError(answer.body).code, 'INVALID_INPUT', `${req.op} ${big.length}`);
    }
    conn.write(encodeRequest(id, { op: 'encrypt', items: [{ keyId: big, plaintext: Buffer.from('x') }] }));
    const [item] = decodeResult('encrypt', (await conn.answer(id++)).body) as {
      ok: boolean;
      error?: { code: string };
    }[];
    t.is(item!.error?.code, 'INVALID_INPUT', `encrypt item ${big.length}`);
  }
  conn.write(encodeRequest(id, { op: 'health' }));
  t.true((decodeResult('health', (await conn.answer(id)).body) as { ok: boolean }).ok);
  t.false(
    daemon.logs.some((line) => line.includes('"INTERNAL"')),
    'nothing was logged as INTERNAL',
  );
});
