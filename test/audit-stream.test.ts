/**
 * AuditStream writes each line as bytes straight into its block buffer. These tests read what it
 * wrote back as text: every line must be the JSON it stands for (UTF-8 fields, error codes,
 * multi-digit sequence numbers), and blocks, small or past the buffer's initial 64 KiB, must
 * verify.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { linkFields } from '../src/audit-link.js';
import type { AuditFields } from '../src/worker-abi/index.js';
import { AuditStream } from '../workers/audit-stream.js';
import { verifyAuditFile } from '../workers/audit-verify-files.js';
import { tempDir } from './helpers/kms.js';

const FIELDS: AuditFields[] = [
  { op: 'encrypt', keyId: 'dek_1', threadId: 't1', kekVersion: 3, caller: 'anonymous', remote: '127.0.0.1' },
  {
    op: 'decrypt',
    keyId: 'dek_ü',
    threadId: 'thread "quoted" \\ \n',
    caller: 'ユーザー',
    detail: 'a\u2028b',
  },
  { op: 'start', detail: 'pid 1' },
];

test('lines are the JSON of their fields, in sequence, and every block verifies', (t) => {
  const auditKey = randomBytes(32);
  const stream = new AuditStream(auditKey);
  const file = path.join(tempDir(t), 'kms-audit.log');
  const expected: { fields: AuditFields; code: string | null; ts: string }[] = [];
  // Blocks of 1 to 700 lines: the largest (~150 KiB) outgrows the initial buffer.
  for (const lines of [1, 2, 64, 700, 3]) {
    const ts = new Date(Date.UTC(2026, 10, 28, 23, 0, lines)).toISOString();
    for (let i = 0; i < lines; i++) {
      const fields = FIELDS[i % FIELDS.length]!;
      const code = i % 5 === 4 ? 'DECRYPT_FAILED' : null;
      stream.add(fields, ts, code === null ? 'ok' : 'error', code);
      expected.push({ fields, code, ts });
    }
    const block = stream.seal();
    if (block === null) return t.fail('a block with lines sealed to nothing');
    fs.appendFileSync(file, block.buffer.subarray(0, block.length));
  }
  t.is(stream.seal(), null);

  const lines = fs.readFileSync(file, 'utf8').split('\n');
  t.is(lines.pop(), '');
  t.is(lines.length, expected.length);
  lines.forEach((line, n) => {
    const { fields, code, ts } = expected[n]!;
    const record = JSON.parse(line) as Record<string, unknown>;
    t.is(record.n, n);
    t.is(record.s, stream.id);
    t.is(record.ts, ts);
    t.is(record.outcome, code === null ? 'ok' : 'error');
    t.is(record.code, code ?? undefined);
    t.is(record.op, fields.op);
    t.is(record.key_id, fields.keyId);
    t.is(record.thread_id, fields.threadId);
    t.is(record.kek_version, fields.kekVersion === undefined ? undefined : String(fields.kekVersion));
    t.is(record.caller, fields.caller);
    t.is(record.remote, fields.remote);
    t.is(record.detail, fields.detail);
  });
  t.deepEqual(verifyAuditFile(auditKey, file), {
    ok: true,
    linesVerified: expected.length,
    firstBadLine: null,
    file: null,
    reason: null,
  });
  // And the signature is over exactly those bytes: any other key rejects the first block.
  t.false(verifyAuditFile(randomBytes(32), file).ok);
});

test('a log written before streams were linked verifies, and may be followed by linked sessions only', (t) => {
  const auditKey = randomBytes(32);
  const dir = tempDir(t);
  const write = (file: string, stream: AuditStream, op: string) => {
    stream.add({ op }, new Date().toISOString(), 'ok', null);
    const block = stream.seal()!;
    fs.appendFileSync(file, block.buffer.subarray(0, block.length));
  };
  const old = new AuditStream(auditKey);
  const linked = new AuditStream(auditKey, linkFields(1, null));
  const upgraded = path.join(dir, 'upgraded.log');
  write(upgraded, old, 'start');
  write(upgraded, old, 'stop');
  write(upgraded, linked, 'start');
  t.true(verifyAuditFile(auditKey, upgraded).ok);

  // An unlinked stream after a linked session is a stream that someone stripped of its link.
  const downgraded = path.join(dir, 'downgraded.log');
  write(downgraded, new AuditStream(auditKey, linkFields(1, null)), 'start');
  write(downgraded, new AuditStream(auditKey), 'start');
  const result = verifyAuditFile(auditKey, downgraded);
  t.false(result.ok);
  t.is(result.firstBadLine, 2);
});

test('a cluster replica names itself on every line, under the signature; a log of lines without it verifies as before', (t) => {
  const auditKey = randomBytes(32);
  const dir = tempDir(t);
  const file = path.join(dir, 'kms-audit.log');
  const plain = new AuditStream(auditKey);
  const replica = new AuditStream(auditKey, null, 'kms-b:2');
  for (const stream of [plain, replica]) {
    for (const fields of FIELDS) stream.add(fields, new Date().toISOString(), 'ok', null);
    const block = stream.seal()!;
    fs.appendFileSync(file, block.buffer.subarray(0, block.length));
  }
  const lines = fs.readFileSync(file, 'utf8').trimEnd().split('\n');
  const records = lines.map((line) => JSON.parse(line) as { replica?: string; s: string });
  t.deepEqual(
    records.map((r) => r.replica),
    [...FIELDS.map(() => undefined), ...FIELDS.map(() => 'kms-b:2')],
  );
  t.true(verifyAuditFile(auditKey, file).ok);

  // Naming another replica on a line is an edit like any other: its block no longer verifies.
  const forged = path.join(dir, 'forged.log');
  const at = FIELDS.length + 1;
  lines[at] = (lines[at] as string).replace('"replica":"kms-b:2"', '"replica":"kms-c:1"');
  fs.writeFileSync(forged, `${lines.join('\n')}\n`);
  const result = verifyAuditFile(auditKey, forged);
  t.false(result.ok);
  // Reported at the forged line's block: lines FIELDS.length + 1 to 2 * FIELDS.length (1-based).
  t.true(
    (result.firstBadLine ?? 0) > FIELDS.length && (result.firstBadLine ?? 0) <= 2 * FIELDS.length,
    `${result.firstBadLine}: ${result.reason}`,
  );
});
