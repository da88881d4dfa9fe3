/**
 * The daemon's HTTP layer in-process, over a stub Kms whose failures we control: readiness (503
 * from /healthz), a KMS that is not ready (503), an unexpected bug (500 with a generic message:
 * nothing of the thrown text reaches the caller), and /healthz turning 503 once draining starts.
 * Also: how the TCP bridge groups pipelined frames into KMS calls. Everything the real KMS does is
 * covered by the tests that run the real daemon.
 */
import test from 'ava';
import type { EncryptResult, ItemResult, Kms, KmsHealth } from '../src/api/index.js';
import { loadDaemonConfig } from '../src/config/daemon.js';
import { resolveMaxBatch } from '../src/config/library.js';
import { kmsError } from '../src/errors.js';
import { startDaemon } from '../src/kms-server/serve.js';
import { createLogger } from '../src/log.js';
import { decodeResult, encodeRequest, FRAME_RESULT } from '../src/wire/bridge-codec.js';
import { BridgeSocket, postJson, request } from './helpers/kms-daemon.js';
import { IDLE_ROTATION, stubHealth } from './helpers/stub-kms.js';

const rotation = IDLE_ROTATION;

interface StubState {
  ready: boolean;
  /** createDekForThread waits for this, so a request can be held in flight. */
  gate: Promise<void>;
  /** Called when createDekForThread starts waiting at the gate. */
  entered: () => void;
}

function stubKms(state: StubState): Kms {
  const unexpected = () => Promise.reject(new Error('plaintext "hunter2" leaked into an error message'));
  const health = async (): Promise<KmsHealth> => stubHealth(state.ready, 7);
  return {
    createDekForThread: async (threadId) => {
      state.entered();
      await state.gate;
      return {
        keyId: `dek_${threadId}`,
        threadId,
        kekId: 'kek_stub',
        kekVersion: 1,
        keyVersion: 1,
        wrapped: Buffer.from('wrapped'),
        createdAt: new Date(0).toISOString(),
      };
    },
    getWrappedDek: () => Promise.reject(kmsError('NOT_READY')),
    encrypt: unexpected,
    decrypt: unexpected,
    encryptBatch: unexpected,
    decryptBatch: () => Promise.reject(kmsError('AUDIT_WRITE_FAILED')),
    reencrypt: unexpected,
    reencryptBatch: unexpected,
    rewrapDek: unexpected,
    rotateDek: unexpected,
    destroyDekVersionsBefore: unexpected,
    destroyDek: unexpected,
    cancelDeletion: unexpected,
    rotateKek: async () => rotation,
    startKekRotation: async () => rotation,
    rotationStatus: async () => rotation,
    health,
    close: async () => {},
  };
}

test('readiness, 5xx mapping without leaks, and draining', async (t) => {
  let openGate = () => {};
  let signalEntered = () => {};
  const entered = new Promise<void>((resolve) => (signalEntered = resolve));
  const state: StubState = {
    ready: false,
    gate: new Promise((resolve) => (openGate = resolve)),
    entered: () => signalEntered(),
  };
  const config = loadDaemonConfig({ endpoint: '127.0.0.1:0', dataDir: 'unused-by-the-stub' });
  const daemon = await startDaemon(config, createLogger('test', 'silent'), async () => stubKms(state));
  t.teardown(() => daemon.close());
  const base = `http://127.0.0.1:${daemon.http.port}`;

  const notReady = await request(base, '/healthz');
  t.is(notReady.status, 503);
  t.is(notReady.json.error.code, 'NOT_READY');
  state.ready = true;
  t.is((await request(base, '/healthz')).status, 200);

  const unready = await request(base, '/get_wrapped?key_id=k');
  t.is(unready.status, 503);
  t.is(unready.json.error.code, 'NOT_READY');
  const audit = await postJson(base, '/decrypt', { key_id: 'k', ciphertext: 'QQ==' });
  t.is(audit.status, 503);
  t.is(audit.json.error.code, 'AUDIT_WRITE_FAILED');

  const bug = await postJson(base, '/encrypt', { key_id: 'k', plaintext: 'QQ==' });
  t.is(bug.status, 500);
  t.deepEqual(bug.json, { error: { code: 'INTERNAL', message: 'internal error' } });
  t.false(bug.text.includes('hunter2'));

  const metrics = await request(base, '/metrics');
  t.regex(metrics.text, /progressdb_kms_pool_queue_depth 7/);
  t.regex(
    metrics.text,
    /progressdb_kms_requests_total\{op="encrypt",transport="http",outcome="server_error"\} 1/,
  );

  // Shutdown waits for the request in flight, which still gets its answer (and Connection: close).
  const held = postJson(base, '/create_dek_for_thread', { thread_id: 't1' });
  await entered;
  let closed = false;
  const closing = daemon.close().then(() => (closed = true));
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
  t.false(closed);
  openGate();
  const answer = await held;
  t.is(answer.status, 200);
  t.is(answer.json.key_id, 'dek_t1');
  t.is(answer.headers.connection, 'close');
  await closing;
  await t.throwsAsync(request(base, '/healthz'));
});

test('the bridge merges pipelined frames into KMS calls of at most one worker task (maxBatch items)', async (t) => {
  const state: StubState = { ready: true, gate: Promise.resolve(), entered: () => {} };
  const callSizes: number[] = [];
  const kms: Kms = {
    ...stubKms(state),
    encryptBatch: async (items) => {
      callSizes.push(items.length);
      return items.map(
        (item): ItemResult<EncryptResult> => ({
          ok: true,
          value: { ciphertext: Buffer.from(item.plaintext), keyVersion: 1 },
        }),
      );
    },
  };
  const config = loadDaemonConfig({
    endpoint: '127.0.0.1:0',
    bridgeEndpoint: '127.0.0.1:0',
    dataDir: 'unused-by-the-stub',
  });
  const daemon = await startDaemon(config, createLogger('test', 'silent'), async () => kms);
  t.teardown(() => daemon.close());
  const conn = new BridgeSocket(daemon.bridge!.port);
  t.teardown(() => conn.destroy());
  // Six frames of a third of a task each, in one write. Merged without a limit they would be one
  // call of two tasks' worth, answered only when all are done; capped, each call is at most one.
  const maxBatch = resolveMaxBatch({});
  const perFrame = Math.ceil(maxBatch / 3);
  const frames = Array.from({ length: 6 }, (_, f) =>
    encodeRequest(f + 1, {
      op: 'encrypt',
      items: Array.from({ length: perFrame }, (_, i) => ({
        keyId: 'k',
        plaintext: Buffer.from(`${f}:${i}`),
      })),
    }),
  );
  conn.write(Buffer.concat(frames));
  await conn.waitFrames(6);
  t.is(
    callSizes.reduce((a, b) => a + b, 0),
    6 * perFrame,
  );
  t.true(
    callSizes.every((n) => n <= maxBatch),
    `calls of ${callSizes.join(', ')} items`,
  );
  // Every frame still gets its own items back, in order.
  for (const frame of conn.frames) {
    t.is(frame.type, FRAME_RESULT);
    const results = decodeResult('encrypt', frame.body) as ItemResult<EncryptResult>[];
    t.deepEqual(
      results.map((r) => (r.ok ? r.value.ciphertext.toString() : r.error.code)),
      Array.from({ length: perFrame }, (_, i) => `${frame.id - 1}:${i}`),
    );
  }
});
