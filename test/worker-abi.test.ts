/**
 * The worker ABI: the batch task and result writer/reader pairs (the one place that knows the slot
 * layout), worker failures crossing as { code, message } data, and the package not exporting any of
 * it.
 */
import test from 'ava';
import { Piscina } from 'piscina';
import { ServiceError } from '../src/errors.js';
import {
  MAX_CIPHERTEXT_OVERHEAD as CIPHERTEXT_OVERHEAD,
  MAX_CIPHERTEXT_LEAD,
  MIN_CIPHERTEXT_OVERHEAD,
  MAX_WRAPPED_KEY_BYTES as WRAPPED_KEY_BYTES,
} from '../src/format.js';
import * as pkg from '../src/index.js';
import { runTask, workerExecArgv, workerFile } from '../src/kms/pool.js';
import { oneOffWorkerInit } from '../src/kms/verify-audit.js';
import {
  type AuditFields,
  BatchResultReader,
  BatchResultWriter,
  BatchTaskReader,
  BatchTaskWriter,
  type CheckKekTask,
  type DekRef,
  OpKind,
  type TaskOutcome,
  type WorkerError,
  workerError,
} from '../src/worker-abi/index.js';

const dek = (keyId: string, keyVersion: number): DekRef => ({
  keyId,
  keyVersion,
  kekVersion: 1,
  wrapped: new Uint8Array(WRAPPED_KEY_BYTES),
});

const bytes = (text: string) => Buffer.from(text);

test('a batch of mixed ops reads back as it was written, in place in one buffer', (t) => {
  const deks = [dek('k1', 2), dek('k2', 3), dek('k2', 1)];
  const audit: AuditFields[] = [{ op: 'encrypt', keyId: 'k1' }];
  const ops = [
    { kind: OpKind.encrypt, dek: 0, input: bytes('hello'), aad: bytes('ctx'), audit: 0, error: -1 },
    {
      kind: OpKind.decrypt,
      dek: 0,
      input: Buffer.alloc(CIPHERTEXT_OVERHEAD + 4, 7),
      aad: null,
      audit: -1,
      error: -1,
    },
    {
      kind: OpKind.reencrypt,
      dek: 1,
      input: Buffer.alloc(CIPHERTEXT_OVERHEAD + 2, 9),
      aad: null,
      audit: 0,
      error: -1,
    },
    { kind: OpKind.generate, dek: 0, input: null, aad: null, audit: -1, error: -1 },
    { kind: OpKind.note, dek: -1, input: null, aad: bytes('a'), audit: 0, error: 0 },
  ] as const;
  let total = 0;
  for (const op of ops)
    total += BatchTaskWriter.bytesFor(op.kind, op.input?.length ?? 0, op.aad?.length ?? 0);
  const writer = new BatchTaskWriter(ops.length, total);
  for (const op of ops) writer.add(op.kind, op.dek, op.input, op.aad, op.audit, op.error);
  const task = writer.finish({
    keks: [],
    deks,
    targetKekVersion: 4,
    audit,
    callers: [],
    errors: ['KEY_NOT_FOUND'],
  });
  t.is(task.type, 'batch');
  t.is(task.data.byteLength, total);
  t.deepEqual(BatchTaskWriter.transferList(task), [task.data, task.ops.buffer]);

  const reader = new BatchTaskReader(task);
  t.is(reader.count, ops.length);
  t.is(reader.data.buffer, task.data, 'the reader works on the task buffer itself');
  ops.forEach((op, i) => {
    t.is(reader.kind(i), op.kind);
    t.deepEqual(reader.input(i), op.input === null ? Buffer.alloc(0) : Buffer.from(op.input));
    t.deepEqual(reader.aad(i), op.aad === null ? null : Buffer.from(op.aad));
    t.is(reader.dek(i), op.dek < 0 ? null : (deks[op.dek] ?? null));
    t.is(reader.audit(i), op.audit < 0 ? null : (audit[op.audit] ?? null));
    t.is(reader.preError(i), op.error < 0 ? null : 'KEY_NOT_FOUND');
  });
  t.is(reader.sourceDek(2), deks[2] ?? null, "a reencrypt's source version follows its current one");
  // Slots are packed in order: each op's output room starts where the previous op's AAD ended.
  t.is(reader.outputOffset(0), 0);
  // Room is laid out for the larger format, whichever the worker seals in.
  t.is(reader.outputOffset(1), 5 + CIPHERTEXT_OVERHEAD + 3);
  t.is(
    reader.input(0).byteOffset,
    reader.outputOffset(0) + MAX_CIPHERTEXT_LEAD,
    'room for any header and nonce',
  );
  t.is(reader.outputOffset(2), reader.outputOffset(1) + CIPHERTEXT_OVERHEAD + 4);
  t.is(
    reader.outputOffset(3),
    reader.outputOffset(2) + CIPHERTEXT_OVERHEAD + 2 + CIPHERTEXT_OVERHEAD - MIN_CIPHERTEXT_OVERHEAD,
    'a reencrypt has room to grow from the smaller format to the larger',
  );
  t.is(reader.outputOffset(4), reader.outputOffset(3) + WRAPPED_KEY_BYTES);
  reader.clearOutput(1);
  t.true(
    reader.input(1).every((b) => b === 0),
    "clearing an op's output zeroes its whole slot",
  );
  t.deepEqual(reader.input(2), Buffer.alloc(CIPHERTEXT_OVERHEAD + 2, 9), 'and nothing of the next op');
});

test('an op naming its key by directory entry carries the entry, its generation and its audit caller instead', (t) => {
  const input = bytes('hello');
  const writer = new BatchTaskWriter(2, 2 * BatchTaskWriter.bytesFor(OpKind.encrypt, input.length, 0));
  writer.add(OpKind.encrypt, -1, input, null, -1, -1, 5, 9, 0);
  writer.add(OpKind.encrypt, 0, input, null, 0, -1);
  const caller = { op: 'encrypt', caller: 'embedded', remote: '127.0.0.1' };
  const fields: AuditFields = { op: 'encrypt', keyId: 'k' };
  const reader = new BatchTaskReader(
    writer.finish({
      keks: [],
      deks: [dek('k', 1)],
      targetKekVersion: 1,
      audit: [fields],
      callers: [caller],
      errors: [],
    }),
  );
  t.deepEqual([reader.entryIndex(0), reader.entryGeneration(0), reader.callerIndex(0)], [5, 9, 0]);
  t.is(reader.dek(0), null);
  t.is(reader.audit(0), null);
  t.deepEqual(
    [reader.entryIndex(1), reader.callerIndex(1), reader.dek(1)?.keyId, reader.audit(1)],
    [-1, -1, 'k', fields],
  );
});

test('batch results read back per op: outputs as views of the returned buffer, errors as data', (t) => {
  const out = new ArrayBuffer(16);
  new Uint8Array(out).set(bytes('abcdefgh'), 4);
  const denied = workerError('AUDIT_WRITE_FAILED', 'audit log write failed (ENOSPC); operation refused');
  const writer = new BatchResultWriter(4);
  writer.ok(0, 4, 3, 2);
  writer.fail(1, workerError('DECRYPT_FAILED'));
  writer.ok(2, 7, 5, 3);
  writer.fail(3, workerError('DECRYPT_FAILED'));
  const result = writer.finish(out, true, undefined);
  t.deepEqual(BatchResultWriter.transferList(result), [result.results.buffer, out]);
  t.is(result.errors.length, 1, 'an error failing several ops is sent once');

  const reader = new BatchResultReader(result);
  t.is(reader.count, 4);
  t.is(reader.error(0), null);
  t.is(reader.output(0).toString(), 'abc');
  t.is(reader.output(0).buffer, out, 'no copy');
  t.is(reader.keyVersion(0), 2);
  t.deepEqual(reader.error(1), {
    code: 'DECRYPT_FAILED',
    message: 'decryption failed: data was tampered with, or wrong key or AAD',
  });
  t.is(reader.keyVersion(1), 0);
  t.is(reader.output(2).toString(), 'defgh');
  t.is(reader.keyVersion(2), 3);
  t.false(reader.auditFailed);

  writer.failAll(denied);
  const failed = new BatchResultReader(writer.finish(out, false, undefined));
  for (let i = 0; i < failed.count; i++) t.deepEqual(failed.error(i), denied);
  t.true(failed.auditFailed);
});

test('a worker failure crosses as { code, message } data and becomes the same CodedError', async (t) => {
  const name = 'PROGRESSDB_TEST_UNSET_MASTER_KEY';
  delete process.env[name];
  const pool = new Piscina({
    filename: workerFile('crypto'),
    minThreads: 1,
    maxThreads: 1,
    workerData: oneOffWorkerInit({ kind: 'env', name }),
  });
  t.teardown(() => pool.destroy());
  const task: CheckKekTask = { type: 'check-kek', keks: [], kcv: null };
  const expected: WorkerError = {
    code: 'MASTER_KEY_MISSING',
    message: `environment variable ${name} is not set`,
  };
  const outcome = (await pool.run(task)) as TaskOutcome<unknown>;
  t.deepEqual(outcome, { ok: false, error: expected });
  const err = await t.throwsAsync(runTask(pool, task), { instanceOf: ServiceError });
  t.is(err?.code, expected.code);
  t.is(err?.message, expected.message);
  t.is(err?.status, 500);
});

test('built workers start without the TypeScript loader a harness runs under; TypeScript workers keep it', (t) => {
  const argv = ['--import=tsx', '--max-old-space-size=512', '--import', 'tsx', '--enable-source-maps'];
  t.deepEqual(workerExecArgv(argv, 'file:///app/dist/workers/crypto.js'), [
    '--max-old-space-size=512',
    '--enable-source-maps',
  ]);
  t.deepEqual(workerExecArgv(argv, 'file:///app/workers/crypto.ts'), argv);
});

test('the package exports the library API and none of the worker ABI', (t) => {
  const exported = Object.keys(pkg);
  t.true(exported.includes('createKms'));
  t.true(exported.includes('UserError'));
  for (const internal of [
    'OpKind',
    'OP_SLOTS',
    'BatchTaskWriter',
    'BatchResultReader',
    'describeMasterKeyRef',
  ]) {
    t.false(exported.includes(internal), internal);
  }
});

test('nor any of its types', (t) => {
  // Checked by the type checker (npm run typecheck): each line fails to compile if the type leaks.
  const internal: unknown[] = [
    // @ts-expect-error internal
    null as import('../src/index.js').BatchTask | null,
    // @ts-expect-error internal
    null as import('../src/index.js').WorkerInit | null,
    // @ts-expect-error internal
    null as import('../src/index.js').MasterKeyRef | null,
  ];
  const health: Pick<import('../src/index.js').KmsHealth, 'ok'> = { ok: true };
  t.is(internal.length, 3);
  t.true(health.ok);
});
