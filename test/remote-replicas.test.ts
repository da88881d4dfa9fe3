/**
 * The remote client over several replicas (src/remote/replica-set.ts): load spreads by calls in
 * flight, a failing replica is left out until its health probe answers, what is safe to repeat
 * moves to another replica, and what is not is never sent twice. Scripted transports make each
 * case exact; the last tests use real daemons.
 */
import test from 'ava';
import { type CodedError, kmsError } from '../src/errors.js';
import type { KmsRequest } from '../src/ops/index.js';
import { createRemoteKms } from '../src/remote/index.js';
import { ReplicaSet } from '../src/remote/replica-set.js';
import { type RemoteTransport, unavailable } from '../src/remote/transport.js';
import { expectCode, sealAndOpen, sealedMessages } from './helpers/kms.js';
import { spawnDaemon } from './helpers/kms-daemon.js';
import { freePort, until } from './helpers/processes.js';

type Behaviour = (req: KmsRequest) => Promise<unknown>;

/** A transport whose answers the test scripts, recording every request it was handed. */
class ScriptedTransport implements RemoteTransport {
  readonly maxBatchBytes = 1 << 20;
  readonly coalesce = true;
  readonly seen: string[] = [];
  closed = false;
  constructor(public behave: Behaviour) {}
  call(req: KmsRequest): Promise<unknown> {
    this.seen.push(req.op);
    return this.behave(req);
  }
  async close(): Promise<void> {
    this.closed = true;
  }
}

const healthy: Behaviour = async (req) => (req.op === 'health' ? { ok: true } : `answer to ${req.op}`);
const refused: Behaviour = async () => {
  throw unavailable('connection refused', false);
};
const droppedAfterSend: Behaviour = async (req) => {
  if (req.op === 'health') return { ok: true };
  throw unavailable('connection reset after the request was written', true);
};

function set(...behaviours: Behaviour[]) {
  const transports = behaviours.map((b) => new ScriptedTransport(b));
  const replicas = new ReplicaSet(transports.map((transport, i) => ({ where: `r${i}`, transport })));
  return { replicas, transports };
}

const op = (name: 'health' | 'encrypt' | 'rotate_dek' | 'get_wrapped'): KmsRequest =>
  (name === 'health' || name === 'encrypt' ? { op: name } : { op: name, keyId: 'k' }) as KmsRequest;

test('calls spread over replicas by calls in flight', async (t) => {
  const gates: (() => void)[] = [];
  const slow: Behaviour = (req) => new Promise((resolve) => gates.push(() => resolve(req.op)));
  const { replicas, transports } = set(slow, slow, slow);
  const pending = Array.from({ length: 6 }, () => replicas.call(op('get_wrapped')));
  t.deepEqual(
    transports.map((tr) => tr.seen.length),
    [2, 2, 2],
  );
  for (const open of gates) open();
  t.deepEqual(await Promise.all(pending), Array(6).fill('get_wrapped'));
  await replicas.close();
  t.true(transports.every((tr) => tr.closed));
});

test('an unreachable replica is left out and the call moves on, for any op', async (t) => {
  const { replicas, transports } = set(refused, healthy);
  // rotate_dek is not repeatable, but a request that surely never left may go elsewhere.
  for (let i = 0; i < 4; i++) t.is(await replicas.call(op('rotate_dek')), 'answer to rotate_dek');
  t.deepEqual(replicas.inRotation(), ['r1']);
  t.is(transports[0]?.seen.filter((o) => o === 'rotate_dek').length, 1, 'tried once, then left out');
  await replicas.close();
});

test('after an unknown outcome only repeatable ops move to another replica', async (t) => {
  const { replicas, transports } = set(droppedAfterSend, healthy);
  // The first call lands on r0 (round robin from the start): encrypt stores nothing, so it moves on.
  t.is(await replicas.call(op('encrypt')), 'answer to encrypt');
  t.deepEqual(replicas.inRotation(), ['r1']);
  await replicas.close();

  const second = set(droppedAfterSend, healthy);
  const err = await t.throwsAsync<CodedError>(second.replicas.call(op('rotate_dek')));
  t.is(err?.code, 'KMS_UNAVAILABLE');
  t.deepEqual(second.transports[1]?.seen, [], 'rotate_dek was not sent a second time');
  await second.replicas.close();
  t.true(transports.every((tr) => tr.closed));
});

test('an answer about the request is not a replica failure: no failover, replica stays in', async (t) => {
  const notFound: Behaviour = async () => {
    throw kmsError('KEY_NOT_FOUND', 'unknown key');
  };
  const { replicas, transports } = set(notFound, healthy);
  await expectCode(t, replicas.call(op('get_wrapped')), 'KEY_NOT_FOUND');
  t.deepEqual(transports[1]?.seen, []);
  t.deepEqual(replicas.inRotation(), ['r0', 'r1']);
  await replicas.close();
});

test('a replica that is out comes back once its health probe answers ok', async (t) => {
  let up = false;
  const flaky: Behaviour = async (req) => {
    if (!up) throw unavailable('down', false);
    return req.op === 'health' ? { ok: true } : 'back';
  };
  const { replicas, transports } = set(flaky, healthy);
  await replicas.call(op('get_wrapped'));
  t.deepEqual(replicas.inRotation(), ['r1']);
  up = true;
  await until(
    'the probe brings r0 back',
    () => (replicas.inRotation().length === 2 ? true : undefined),
    5000,
  );
  t.true(transports[0]?.seen.includes('health'));
  await replicas.close();
});

test('with every replica out, calls still try each one and fail with the last error', async (t) => {
  const { replicas, transports } = set(refused, refused);
  await expectCode(t, replicas.call(op('get_wrapped')), 'KMS_UNAVAILABLE');
  t.deepEqual(replicas.inRotation(), []);
  await expectCode(t, replicas.call(op('get_wrapped')), 'KMS_UNAVAILABLE');
  t.deepEqual(
    transports.map((tr) => tr.seen.filter((o) => o === 'get_wrapped').length),
    [2, 2],
  );
  await replicas.close();
});

test('endpoint lists: comma-separated or an array, no duplicates, one transport kind', async (t) => {
  t.throws(() => createRemoteKms({}), { message: /endpoint/ });
  t.throws(() => createRemoteKms({ endpoint: 'a:1, a:1' }), { message: /twice/ });
  t.throws(() => createRemoteKms({ endpoints: ['http://a:1', 'tcp://b:2'] }), { message: /same transport/ });
  const kms = createRemoteKms({ endpoint: '127.0.0.1:1, 127.0.0.1:2' });
  await kms.close();
  t.pass();
});

test('a client given a dead replica and a live daemon sees no failure', async (t) => {
  const daemon = await spawnDaemon({ bridgePort: 0 });
  t.teardown(() => daemon.kill9());
  const dead = await freePort();
  for (const endpoints of [
    [`http://127.0.0.1:${dead}`, `http://${daemon.http}`],
    [`tcp://127.0.0.1:${dead}`, `tcp://${daemon.bridge}`],
  ]) {
    const kms = createRemoteKms({ endpoints, retries: 0 });
    const dek = await kms.createDekForThread(`replicas-${endpoints[0]}`);
    t.deepEqual(await sealAndOpen(kms, dek.keyId, 20, 'message '), sealedMessages(20, 'message '));
    await kms.close();
  }
});
