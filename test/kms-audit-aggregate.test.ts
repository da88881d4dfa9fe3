/**
 * audit_data_ops: aggregate (the default) against each: data-plane ops counted per key, op,
 * caller and outcome in each block with the exact count, control-plane ops a line each, the log
 * still verifying, and no count lost when the process is killed under load.
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import type { Kms } from '../src/api/index.js';
import {
  type AuditLine,
  auditLines,
  auditPath,
  expectCode,
  openKms,
  startChild,
  tempDir,
  writeMasterKey,
  writeScript,
} from './helpers/kms.js';
import { until } from './helpers/processes.js';

const DATA_OPS = new Set(['encrypt', 'decrypt', 'reencrypt']);

/** Operations the log accounts for per `op/key/outcome[/code]`: a line's count, or 1. */
function accounted(lines: AuditLine[]): Map<string, number> {
  const totals = new Map<string, number>();
  for (const l of lines) {
    const key = [l.op, l.key_id ?? '-', l.outcome, ...(l.code === undefined ? [] : [l.code])].join('/');
    totals.set(key, (totals.get(key) ?? 0) + (l.count ?? 1));
  }
  return totals;
}

/** One batch of each data op with repeats, failures and two keys; returns what was sent. */
async function mixedBatches(kms: Kms, a: string, b: string) {
  const x = Buffer.from('x');
  const sealed = await kms.encryptBatch([
    ...Array.from({ length: 10 }, () => ({ keyId: a, plaintext: x, aad: x })),
    ...Array.from({ length: 5 }, () => ({ keyId: b, plaintext: x, aad: x })),
    ...Array.from({ length: 3 }, () => ({ keyId: 'dek_missing', plaintext: x })),
  ]);
  const ciphertexts = sealed.slice(0, 15).map((r) => (r.ok ? r.value.ciphertext : Buffer.alloc(0)));
  await kms.decryptBatch([
    ...ciphertexts.map((ciphertext, i) => ({ keyId: i < 10 ? a : b, ciphertext, aad: x })),
    // Wrong AAD twice under a: a failure tallied apart from a's successes.
    ...ciphertexts.slice(0, 2).map((ciphertext) => ({ keyId: a, ciphertext, aad: Buffer.from('y') })),
  ]);
}

test('aggregate: one line per key, op and outcome in a block, with exact counts; the log verifies', async (t) => {
  const { kms, dataDir } = await openKms(t, { poolSize: 1 });
  const a = (await kms.createDekForThread('thread-a')).keyId;
  const b = (await kms.createDekForThread('thread-b')).keyId;
  await mixedBatches(kms, a, b);
  const lines = auditLines(dataDir);
  const data = lines.filter((l) => DATA_OPS.has(l.op));
  t.deepEqual(
    data.map((l) => [l.op, l.key_id, l.outcome, l.code, l.count]),
    [
      ['encrypt', a, 'ok', undefined, 10],
      ['encrypt', b, 'ok', undefined, 5],
      ['encrypt', 'dek_missing', 'error', 'KEY_NOT_FOUND', 3],
      ['decrypt', a, 'ok', undefined, 10],
      ['decrypt', b, 'ok', undefined, 5],
      ['decrypt', a, 'error', 'DECRYPT_FAILED', 2],
    ],
  );
  // Control-plane operations keep a line each, with no count.
  const creates = lines.filter((l) => l.op === 'create_dek_for_thread');
  t.is(creates.length, 2);
  t.true(creates.every((l) => l.count === undefined));
  t.true((await kms.verifyAudit()).ok);
});

test('each: the same traffic is a line per operation, and both modes account for the same totals', async (t) => {
  const each = await openKms(t, { poolSize: 1, auditDataOps: 'each' });
  const aggregate = await openKms(t, { poolSize: 2 });
  const totals: Map<string, number>[] = [];
  for (const { kms, dataDir } of [each, aggregate]) {
    const a = (await kms.createDekForThread('thread-a')).keyId;
    const b = (await kms.createDekForThread('thread-b')).keyId;
    await mixedBatches(kms, a, b);
    // Key ids differ between the two KMSs: name them by thread.
    const names = new Map([
      [a, 'a'],
      [b, 'b'],
    ]);
    const lines = auditLines(dataDir)
      .filter((l) => DATA_OPS.has(l.op))
      .map((l) => ({ ...l, key_id: names.get(l.key_id ?? '') ?? l.key_id }));
    if (kms === each.kms) {
      t.is(lines.length, 18 + 17);
      t.true(lines.every((l) => l.count === undefined));
    }
    totals.push(accounted(lines));
    t.true((await kms.verifyAudit()).ok);
  }
  t.deepEqual(totals[1], totals[0]);
});

test('aggregate: callers are never merged, and concurrent single calls are all counted', async (t) => {
  const { kms, dataDir } = await openKms(t, { poolSize: 2 });
  const keys = await Promise.all(Array.from({ length: 20 }, (_, i) => kms.createDekForThread(`thread-${i}`)));
  const sent = new Map<string, number>();
  await Promise.all(
    Array.from({ length: 600 }, (_, i) => {
      // A few busy keys and a tail, from two callers.
      const key = keys[i % 7 === 0 ? i % 20 : i % 3]?.keyId as string;
      const caller = i % 2 === 0 ? 'alice' : 'bob';
      const name = `${caller}/${key}`;
      sent.set(name, (sent.get(name) ?? 0) + 1);
      return kms.encrypt(key, Buffer.from('x'), undefined, { caller });
    }),
  );
  const counted = new Map<string, number>();
  for (const l of auditLines(dataDir).filter((l) => l.op === 'encrypt')) {
    const name = `${l.caller}/${l.key_id}`;
    counted.set(name, (counted.get(name) ?? 0) + (l.count ?? 1));
  }
  t.deepEqual(new Map([...counted].sort()), new Map([...sent].sort()));
  t.true((await kms.verifyAudit()).ok);
});

test('auditDataOps must be each or aggregate', async (t) => {
  await expectCode(t, openKms(t, { auditDataOps: 'sometimes' as 'each' }), 'CONFIG_INVALID');
  const err = await openKms(t, { auditDataOps: 'sometimes' as 'each' }).catch((e: Error) => e);
  t.regex(String(err), /auditDataOps must be one of each, aggregate, got "sometimes"/);
});

test('kill -9 under load: every operation a caller saw succeed is counted in the log', async (t) => {
  const dir = tempDir(t, 'pdb-audit-agg-kill-');
  const { file: keyFile } = writeMasterKey(dir);
  const dataDir = path.join(dir, 'kms');
  // The child reports each success in a file (one write per op, after its promise resolved): a
  // report written is an op whose result was released before the kill. A file, not stdout: a
  // pipe the parent drains more slowly than ops complete fails writeSync with EAGAIN.
  const acks = path.join(dir, 'acks');
  const script = writeScript(
    dir,
    'load',
    `import fs from 'node:fs';
import { createKms } from 'KMS_MODULE';
const [dataDir, keyFile, acks] = process.argv.slice(2);
const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2 });
const keys = [];
for (let i = 0; i < 30; i++) keys.push((await kms.createDekForThread('thread-' + i)).keyId);
const out = fs.openSync(acks, 'a');
let i = 0;
const caller = async () => {
  for (;;) {
    const n = i++;
    const k = n % 4 === 0 ? (n / 4) % 30 : n % 3;
    await kms.encrypt(keys[k], Buffer.from('x'));
    fs.writeSync(out, keys[k] + '\\n');
  }
};
for (let c = 0; c < 64; c++) caller();
`,
  );
  const child = startChild(t, script, [dataDir, keyFile, acks]);
  const ackedLines = () => (fs.existsSync(acks) ? fs.readFileSync(acks, 'utf8').split('\n') : []);
  await until('3,000 acknowledged encrypts', () => (ackedLines().length > 3000 ? true : undefined));
  child.kill('SIGKILL');
  const exit = await child.exited;
  t.is(exit.signal, 'SIGKILL', exit.stderr);
  const acked = new Map<string, number>();
  // Only whole lines: the last one may have been cut by the kill.
  for (const line of ackedLines().slice(0, -1)) acked.set(line, (acked.get(line) ?? 0) + 1);

  // Every complete line in the log, signed or not: an acknowledged op's block was written whole
  // before its result was released.
  const text = fs.readFileSync(auditPath(dataDir), 'utf8').split('\n').slice(0, -1);
  const counted = new Map<string, number>();
  for (const line of text) {
    const l = JSON.parse(line) as AuditLine;
    if (l.op === 'encrypt' && l.key_id !== undefined)
      counted.set(l.key_id, (counted.get(l.key_id) ?? 0) + (l.count ?? 1));
  }
  t.is(acked.size, 30);
  for (const [keyId, n] of acked) {
    t.true((counted.get(keyId) ?? 0) >= n, `${keyId}: ${n} acknowledged, ${counted.get(keyId)} counted`);
  }
  const { kms } = await openKms(t, { dataDir, masterKeyFile: keyFile });
  t.true((await kms.verifyAudit()).ok);
});
