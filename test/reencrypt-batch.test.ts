/**
 * reencrypt as a batch: the library's reencryptBatch answers each ciphertext on its own, in
 * order; the daemon takes it as `batch_input` on POST /reencrypt and as op 0x0d on the bridge
 * (both remote transports give what embedded gives); the server's DEK-rotation job against an
 * external KMS sends one request per page of messages instead of one per message.
 */
import test, { type ExecutionContext } from 'ava';
import type { DecryptItem, EncryptResult, ItemResult, Kms } from '../src/api/index.js';
import { createRemoteKms } from '../src/remote/index.js';
import { openKms } from './helpers/kms.js';
import { b64, type Daemon, postJson, request, spawnDaemon } from './helpers/kms-daemon.js';
import { missingOrWrong, seed } from './helpers/load.js';
import { startKmsDaemon, startServer } from './helpers/server.js';

const aad = Buffer.from('thread/message');

/** Encrypts two bodies under version 1, rotates the DEK, and reencrypts them with a bad item between. */
async function reencryptThree(t: ExecutionContext, kms: Kms, threadId: string) {
  const dek = await kms.createDekForThread(threadId);
  const a = await kms.encrypt(dek.keyId, Buffer.from('a'), aad);
  const b = await kms.encrypt(dek.keyId, Buffer.from('b'), aad);
  t.is((await kms.rotateDek(dek.keyId)).keyVersion, 2);
  const items: DecryptItem[] = [
    { keyId: dek.keyId, ciphertext: a.ciphertext, aad },
    { keyId: dek.keyId, ciphertext: b.ciphertext, aad: Buffer.from('wrong') },
    { keyId: dek.keyId, ciphertext: b.ciphertext, aad },
  ];
  return { keyId: dek.keyId, results: await kms.reencryptBatch(items) };
}

async function checkThree(
  t: ExecutionContext,
  kms: Kms,
  keyId: string,
  results: ItemResult<EncryptResult>[],
) {
  t.is(results.length, 3);
  const [first, bad, third] = results;
  t.true(first?.ok && first.value.keyVersion === 2);
  t.is(!bad?.ok && bad?.error.code, 'DECRYPT_FAILED');
  t.true(third?.ok && third.value.keyVersion === 2);
  if (first?.ok && third?.ok) {
    t.is((await kms.decrypt(keyId, first.value.ciphertext, aad)).toString(), 'a');
    t.is((await kms.decrypt(keyId, third.value.ciphertext, aad)).toString(), 'b');
  }
  t.deepEqual(await kms.reencryptBatch([]), []);
}

test('library: reencryptBatch answers each item under the current version, in order', async (t) => {
  const { kms } = await openKms(t);
  const { keyId, results } = await reencryptThree(t, kms, 'embedded');
  await checkThree(t, kms, keyId, results);
});

let daemon: Daemon;
test.before(async () => {
  daemon = await spawnDaemon({ bridgePort: 0 });
});
test.after.always(async () => {
  await daemon?.kill9();
});

for (const [name, endpointOf] of [
  ['http', (d: Daemon) => `http://${d.http}`],
  ['tcp', (d: Daemon) => `tcp://${d.bridge}`],
] as const) {
  test(`${name}: reencryptBatch through the daemon gives what embedded gives`, async (t) => {
    const kms = createRemoteKms({ endpoint: endpointOf(daemon) });
    t.teardown(() => kms.close());
    const { keyId, results } = await reencryptThree(t, kms, `remote-${name}`);
    await checkThree(t, kms, keyId, results);
  });
}

test('HTTP: POST /reencrypt takes batch_input; the single body is answered as before', async (t) => {
  const base = `http://${daemon.http}`;
  const dek = await postJson(base, '/create_dek_for_thread', { thread_id: 'http-batch' });
  const keyId = dek.json.key_id;
  const ct = (await postJson(base, '/encrypt', { key_id: keyId, plaintext: b64('x'), aad: b64('a') })).json;
  await postJson(base, '/rotate_dek', { key_id: keyId });
  const batch = await postJson(base, '/reencrypt', {
    batch_input: [
      { key_id: keyId, ciphertext: ct.ciphertext, aad: b64('a') },
      { key_id: keyId, ciphertext: ct.ciphertext },
      { key_id: keyId, ciphertext: ct.ciphertext, aad: b64('a'), extra: 1 },
    ],
  });
  t.is(batch.status, 200);
  const [ok, bad, unknownField] = batch.json.batch_results;
  t.is(ok.key_version, '2');
  t.is(bad.error.code, 'DECRYPT_FAILED');
  t.is(unknownField.error.code, 'INVALID_INPUT');
  const single = await postJson(base, '/reencrypt', {
    key_id: keyId,
    ciphertext: ct.ciphertext,
    aad: b64('a'),
  });
  t.is(single.status, 200);
  t.deepEqual(Object.keys(single.json), ['ciphertext', 'key_version']);
  t.is(single.json.key_version, '2');
});

function reencryptRequests(metrics: string): number {
  let n = 0;
  for (const line of metrics.split('\n')) {
    if (line.startsWith('progressdb_kms_requests_total{') && line.includes('op="reencrypt"')) {
      n += Number(line.slice(line.lastIndexOf(' ') + 1));
    }
  }
  return n;
}

test('server: rotating a thread DEK against an external KMS sends one reencrypt request per page', async (t) => {
  const kmsDaemon = await startKmsDaemon();
  t.teardown(() => kmsDaemon.kill9());
  const server = await startServer({
    mode: 'external',
    kmsEndpoint: kmsDaemon.endpoint,
    env: { PROGRESSDB_JOB_BATCH_SIZE: '16' },
  });
  t.teardown(() => server.stop());
  const tid = await server.api.createThread('rotated in pages');
  const expected = await seed(server.api, tid, 40);
  const rotated = await server.admin.post('/admin/encryption/rotate-thread-dek?wait=true', {
    thread_id: tid,
  });
  t.is(rotated.status, 200);
  t.is(rotated.body.reencrypted, 40);
  t.is(rotated.body.total, 40, 'the job reports the messages it had to do');
  const metrics = await request(`http://${kmsDaemon.endpoint}`, '/metrics');
  t.is(reencryptRequests(metrics.text), 3, '40 messages in pages of 16');
  t.deepEqual((await missingOrWrong(server.api, tid, expected)).problems, []);
});
