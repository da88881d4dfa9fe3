/**
 * The embedded KMS audit log: one line per operation with auditDataOps: each (failures too), no secrets in it, signature
 * and chain verification (library and CLI) catching edits, deletions, insertions and reordering,
 * and failing closed when the log cannot be written at run time.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { auditVerifyCommand } from '../src/cli/kms-commands/audit-verify.js';
import { tornTailStart } from '../src/kms/audit-file.js';
import { verifyAuditFile } from '../workers/audit-verify-files.js';
import { loadRootKeys } from '../workers/master-key.js';
import {
  type AuditLine,
  auditLines,
  auditPath,
  auditText,
  captureStdout,
  openKms,
  ROOT,
  runProcess,
  startChild,
  tempDir,
  writeScript,
} from './helpers/kms.js';

/**
 * Opens a KMS (one worker, so one audit stream in call order, and a line per data op) and runs a
 * known sequence. kms-audit-aggregate.test.ts covers the default, aggregated data-op lines.
 */
async function knownSequence(t: ExecutionContext) {
  const fixture = await openKms(t, { poolSize: 1, auditDataOps: 'each' });
  const { kms } = fixture;
  const marker = `PLAINTEXT-MARKER-${randomBytes(8).toString('hex')}`;
  const aadMarker = `AAD-MARKER-${randomBytes(8).toString('hex')}`;
  const dek = await kms.createDekForThread('thread-audit');
  await kms.createDekForThread('thread-audit');
  const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from(marker), Buffer.from(aadMarker));
  await kms.decrypt(dek.keyId, ciphertext, Buffer.from(aadMarker));
  await kms.decrypt(dek.keyId, ciphertext, Buffer.from('wrong')).catch(() => {});
  await kms.encrypt('dek_unknown', Buffer.from(marker)).catch(() => {});
  await kms.encrypt(dek.keyId, marker as unknown as Uint8Array).catch(() => {});
  const wrapped = await kms.getWrappedDek(dek.keyId);
  await kms.rotateDek(dek.keyId);
  await kms.encryptBatch([
    { keyId: dek.keyId, plaintext: Buffer.from(marker) },
    { keyId: 'dek_missing', plaintext: Buffer.from(marker) },
    { keyId: dek.keyId, plaintext: Buffer.from(marker) },
  ]);
  await kms.createDekForThread(42 as unknown as string).catch(() => {});
  const expected: [op: string, outcome: string, code?: string][] = [
    ['start', 'ok'],
    ['create_dek_for_thread', 'ok'],
    ['create_dek_for_thread', 'ok'],
    ['encrypt', 'ok'],
    ['decrypt', 'ok'],
    ['decrypt', 'error', 'DECRYPT_FAILED'],
    ['encrypt', 'error', 'KEY_NOT_FOUND'],
    ['encrypt', 'error', 'INVALID_INPUT'],
    ['get_wrapped', 'ok'],
    ['rotate_dek', 'ok'],
    ['encrypt', 'ok'],
    ['encrypt', 'error', 'KEY_NOT_FOUND'],
    ['encrypt', 'ok'],
    ['create_dek_for_thread', 'error', 'INVALID_INPUT'],
  ];
  return { ...fixture, dek, marker, aadMarker, wrapped: wrapped.wrapped, expected };
}

function summary(lines: AuditLine[]): [string, string, string?][] {
  return lines.map((l) => (l.code === undefined ? [l.op, l.outcome] : [l.op, l.outcome, l.code]));
}

test('each line names its own caller and remote address, whatever context objects callers pass', async (t) => {
  const { kms, dataDir } = await openKms(t, { poolSize: 1, auditDataOps: 'each' });
  const dek = await kms.createDekForThread('thread-callers');
  const plaintext = Buffer.from('x');
  // Fresh context objects with equal values (as the server makes per request), then other values:
  // the audit fields are shared between equal contexts, never across different ones.
  const calls: [caller: string, remote: string][] = [
    ['alice', '10.0.0.1'],
    ['alice', '10.0.0.1'],
    ['bob', '10.0.0.1'],
    ['alice', '10.0.0.2'],
    ['alice', '10.0.0.1'],
  ];
  await Promise.all(
    calls.map(([caller, remoteAddress]) =>
      kms.encrypt(dek.keyId, plaintext, undefined, { caller, remoteAddress }),
    ),
  );
  await kms.encrypt(dek.keyId, plaintext);
  const encrypts = auditLines(dataDir).filter((l) => l.op === 'encrypt');
  t.deepEqual(
    encrypts.map((l) => [l.caller, l.remote]),
    [...calls, ['embedded', undefined]],
  );
});

test('notes (get_wrapped) are audited on a worker whose first task holds no crypto', async (t) => {
  const { kms, dataDir } = await openKms(t, { poolSize: 2 });
  const dek = await kms.createDekForThread('thread-notes');
  // A burst meeting idle workers is split between them, so both workers get some of these notes,
  // and at most one of them has done any crypto yet.
  await Promise.all(Array.from({ length: 40 }, () => kms.getWrappedDek(dek.keyId)));
  t.is(auditLines(dataDir).filter((l) => l.op === 'get_wrapped').length, 40);
});

test('a block cut short by a crash is dropped at the next start, recorded, and the log verifies', async (t) => {
  const { kms, dataDir, keyFile, reopen } = await openKms(t);
  const dek = await kms.createDekForThread('thread-torn');
  await kms.encrypt(dek.keyId, Buffer.from('x'));
  await kms.close();
  const log = auditPath(dataDir);
  const intact = fs.readFileSync(log);
  // What a kill -9 during a worker's write can leave: whole lines of a block without its signed
  // last line, then half a line.
  const unsigned = (n: number) =>
    `{"v":1,"ts":"2026-01-01T00:00:00.000Z","s":"0123456789ab","n":${n},"outcome":"ok","op":"encrypt"}\n`;
  const torn = Buffer.from(`${unsigned(0)}${unsigned(1)}{"v":1,"ts":"2026-01-01T00:00`);
  fs.appendFileSync(log, torn);

  // A wrong master key refuses to start and leaves the log exactly as it was, torn tail included.
  const wrongKey = path.join(path.dirname(keyFile), 'wrong.key');
  fs.writeFileSync(wrongKey, randomBytes(32).toString('hex'), { mode: 0o600 });
  await t.throwsAsync(reopen({ masterKeyFile: wrongKey }), { code: 'MASTER_KEY_MISMATCH' });
  t.deepEqual(fs.readFileSync(log), Buffer.concat([intact, torn]));

  const again = await reopen();
  t.true((await again.verifyAudit()).ok);
  const after = fs.readFileSync(log);
  t.deepEqual(after.subarray(0, intact.length), intact, 'every complete block is kept as it was');
  const added = auditLines(dataDir).slice(intact.toString().split('\n').length - 1);
  t.deepEqual(
    added.map((l) => [l.op, l.detail]),
    [
      ['audit_repair', `dropped ${torn.length} bytes of a block cut short by a crash`],
      ['start', `pid ${process.pid}`],
    ],
  );

  // Complete but unsigned lines alone (the write stopped at a line end) are dropped the same way.
  await again.close();
  fs.appendFileSync(log, unsigned(2));
  const third = await reopen();
  t.true((await third.verifyAudit()).ok);
  t.is(auditLines(dataDir).filter((l) => l.op === 'audit_repair').length, 2);
});

test('tornTailStart finds the last signed line from the end, across chunk boundaries', (t) => {
  const file = path.join(tempDir(t, 'torn-'), 'log');
  const signed = `{"v":1,"n":0,"op":"start","mac":"${'ab'.repeat(32)}"}\n`;
  const unsigned = (bytes: number) =>
    `{"v":1,"op":"encrypt","pad":"${'x'.repeat(bytes - 30)}"}\n`.padEnd(bytes, ' ');
  const cases: [string, string, number | null][] = [
    ['empty log', '', null],
    ['ends with a signed line', signed + signed, null],
    ['half a line after it', `${signed}{"v":1,"op"`, signed.length],
    // 64 KiB chunks are read from the end: this signed line straddles the first chunk boundary.
    ['a long torn tail', signed + unsigned(64 * 1024 - 10), signed.length],
    ['no signed line at all', unsigned(200 * 1024), 0],
  ];
  for (const [what, content, expected] of cases) {
    fs.writeFileSync(file, content);
    t.is(tornTailStart(file), expected, what);
  }
});

test('every operation writes one signed line, failures too; no plaintext or key material', async (t) => {
  const { kms, dataDir, dek, marker, aadMarker, keyHex, wrapped, expected, reopen } = await knownSequence(t);
  const lines = auditLines(dataDir);
  t.deepEqual(summary(lines), expected);
  lines.forEach((line, i) => {
    t.is(line.v, 1);
    t.false(Number.isNaN(Date.parse(line.ts)), `line ${i + 1} time`);
    t.is(line.n, i, 'one stream, numbered in order');
  });
  const created = lines[1]!;
  t.like(created, { key_id: dek.keyId, thread_id: 'thread-audit', kek_version: '1', caller: 'embedded' });
  t.like(lines[3], { key_id: dek.keyId, thread_id: 'thread-audit' });
  t.is(lines[6]!.key_id, 'dek_unknown');
  t.truthy(lines.at(-1)!.mac);

  const text = fs.readFileSync(auditPath(dataDir), 'utf8');
  const master = Buffer.from(keyHex, 'hex');
  const secrets: Record<string, string> = {
    'plaintext marker': marker,
    'plaintext marker (hex)': Buffer.from(marker).toString('hex'),
    'plaintext marker (base64)': Buffer.from(marker).toString('base64'),
    'AAD marker': aadMarker,
    'master key hex': keyHex,
    'master key HEX': keyHex.toUpperCase(),
    'master key base64': master.toString('base64'),
    'master key base64url': master.toString('base64url'),
    'wrapped DEK hex': wrapped.toString('hex'),
    'wrapped DEK base64': wrapped.toString('base64'),
  };
  for (const [what, needle] of Object.entries(secrets)) t.false(text.includes(needle), what);

  // Close and reopen add a stop and a start line (a new worker stream), and the log still verifies.
  await kms.close();
  const again = await reopen();
  await again.encrypt(dek.keyId, Buffer.from('x'));
  const result = await again.verifyAudit();
  const after = auditLines(dataDir);
  t.deepEqual(summary(after.slice(expected.length)), [
    ['stop', 'ok'],
    ['start', 'ok'],
    ['encrypt', 'ok'],
  ]);
  t.not(after.at(-1)!.s, lines[0]!.s, 'a new stream per worker');
  t.deepEqual(result, {
    ok: true,
    linesVerified: after.length,
    firstBadLine: null,
    file: null,
    reason: null,
  });
});

/** The 1-based number of the first line of the signed block that holds line index `k`. */
function blockStart(lines: AuditLine[], k: number): number {
  let j = k;
  while (j > 0 && lines[j - 1]!.s === lines[k]!.s && lines[j - 1]!.mac === undefined) j--;
  return j + 1;
}

test('audit verify passes an intact log and reports the first bad line of tampered copies', async (t) => {
  const { kms, dir, dataDir, keyFile } = await knownSequence(t);
  await kms.close();
  const intact = await captureStdout(() => auditVerifyCommand({ dataDir, masterKeyFile: keyFile }));
  const raw = auditText(dataDir);
  const lines = raw.map((l) => JSON.parse(l) as AuditLine);
  t.is(intact.result, 0);
  t.is(intact.out.trim(), `ok: ${raw.length} lines verified in ${auditPath(dataDir)}`);

  const failedLine = lines.findIndex((l) => l.code === 'DECRYPT_FAILED');
  const batchMiddle = lines.findIndex((l, i) => l.code === 'KEY_NOT_FOUND' && i > failedLine + 1);
  t.true(failedLine > 0 && batchMiddle > failedLine);
  t.truthy(lines[failedLine]!.mac, 'the failed decrypt is a block of its own');
  t.is(lines[batchMiddle]!.mac, undefined, 'the batch shares one signed block');

  const cases: Record<string, { edit: (l: string[]) => string[]; firstBad: number }> = {
    'edited outcome': {
      edit: (l) => l.map((s, i) => (i === failedLine ? s.replace('"outcome":"error"', '"outcome":"ok"') : s)),
      firstBad: failedLine + 1,
    },
    'edited key id inside a block': {
      edit: (l) => l.map((s, i) => (i === batchMiddle ? s.replace('dek_missing', 'dek_elsewhere') : s)),
      firstBad: blockStart(lines, batchMiddle),
    },
    'edited caller on the first line': {
      edit: (l) => l.map((s, i) => (i === 0 ? s.replace('"op":"start"', '"op":"stop"') : s)),
      firstBad: 1,
    },
    'deleted line': { edit: (l) => l.filter((_, i) => i !== failedLine), firstBad: failedLine + 1 },
    'deleted first line': { edit: (l) => l.slice(1), firstBad: 1 },
    'inserted copy': {
      edit: (l) => [...l.slice(0, failedLine + 1), l[failedLine]!, ...l.slice(failedLine + 1)],
      firstBad: failedLine + 2,
    },
    'swapped lines': {
      edit: (l) => {
        const out = [...l];
        [out[2], out[failedLine]] = [out[failedLine]!, out[2]!];
        return out;
      },
      firstBad: 3,
    },
    'swapped adjacent lines': {
      edit: (l) => {
        const out = [...l];
        [out[failedLine], out[failedLine + 1]] = [out[failedLine + 1]!, out[failedLine]!];
        return out;
      },
      firstBad: failedLine + 1,
    },
    'garbage line': {
      edit: (l) => [...l.slice(0, 4), 'not json', ...l.slice(4)],
      firstBad: 5,
    },
  };
  // The first case through the command (its output and exit code), the others through the
  // verifier it runs in its worker, in this process: each command run starts a worker, seconds
  // under coverage, for the same code.
  const { auditKey } = loadRootKeys({ kind: 'file', path: keyFile });
  for (const [n, [what, { edit, firstBad }]] of Object.entries(cases).entries()) {
    const copy = path.join(dir, `tampered-${what.replaceAll(' ', '-')}`);
    fs.mkdirSync(copy);
    const edited = edit(raw);
    t.notDeepEqual(edited, raw, `${what}: the copy differs`);
    fs.writeFileSync(auditPath(copy), `${edited.join('\n')}\n`);
    if (n === 0) {
      const { result, out } = await captureStdout(() =>
        auditVerifyCommand({ dataDir: copy, masterKeyFile: keyFile }),
      );
      t.is(result, 1, what);
      t.regex(out, new RegExp(`^first bad line: ${firstBad}$`, 'm'), `${what}: ${out}`);
    }
    const verdict = verifyAuditFile(auditKey, auditPath(copy));
    t.false(verdict.ok, what);
    t.is(verdict.firstBadLine, firstBad, `${what}: ${verdict.reason}`);
  }
  auditKey.fill(0);

  // The same log checked with another master key fails at its first line.
  const otherKey = path.join(dir, 'other.key');
  fs.writeFileSync(otherKey, randomBytes(32).toString('hex'), { mode: 0o600 });
  const wrongKey = await captureStdout(() => auditVerifyCommand({ dataDir, masterKeyFile: otherKey }));
  t.is(wrongKey.result, 1);
  t.regex(wrongKey.out, /^first bad line: 1$/m);

  // And through the real command line: exit codes 0 and 1.
  const cli = path.join(ROOT, 'src/cli/progressdb-kms.ts');
  const script = writeScript(
    dir,
    'cli',
    `process.argv.splice(2, 0, 'audit', 'verify');\nawait import(${JSON.stringify(cli)});\n`,
  );
  const ok = await startChild(t, script, ['--data-dir', dataDir, '--master-key-file', keyFile]).exited;
  t.is(ok.code, 0, ok.stderr);
  t.regex(ok.stdout, new RegExp(`ok: ${raw.length} lines verified`));
  const bad = await startChild(t, script, [
    '--data-dir',
    path.join(dir, 'tampered-deleted-line'),
    '--master-key-file',
    keyFile,
  ]).exited;
  t.is(bad.code, 1);
  t.regex(bad.stdout, new RegExp(`first bad line: ${failedLine + 1}`));
});

test('a runtime audit write failure fails the operation and every later one (fail closed)', async (t) => {
  // Root ignores file modes, so the failure comes from a file size limit instead: the child
  // starts normally, then lowers its own RLIMIT_FSIZE (prlimit on its pid) to a little above the
  // log's current size. Writes past the limit fail with EFBIG (Node ignores SIGXFSZ, and bash's
  // trap keeps it ignored). The limit holds for every write at an offset past it, LMDB's too
  // (lmdb-js aborts the process on such an error), so the child first grows the log well past
  // the registry file: the registry's own writes (audit heads) then stay below the limit.
  const fixture = await openKms(t, { poolSize: 2 });
  const dek = await fixture.kms.createDekForThread('thread-fail');
  const earlier = await fixture.kms.encrypt(dek.keyId, Buffer.from('written before'));
  await fixture.kms.close();
  const script = writeScript(
    fixture.dir,
    'efbig',
    `import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { createKms } from 'KMS_MODULE';
const [dataDir, keyFile, keyId] = process.argv.slice(2);
const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2 });
const size = (name) => fs.statSync(dataDir + '/' + name).size;
const filler = Array.from({ length: 500 }, () => ({ keyId, plaintext: Buffer.from('filler') }));
for (let i = 0; i < 200 && size('kms-audit.log') < size('registry.mdb') + (1 << 20); i++) {
  await kms.encryptBatch(filler);
}
const limit = size('kms-audit.log') + 2000;
execFileSync('prlimit', ['--pid', String(process.pid), '--fsize=' + limit]);
const outcomes = [];
const record = async (op, f) => {
  try { await f(); outcomes.push([op, 'ok']); } catch (e) { outcomes.push([op, e.code]); }
};
for (let i = 0; i < 40; i++) await record('encrypt', () => kms.encrypt(keyId, Buffer.from('payload ' + i)));
await record('batch', async () => {
  const r = await kms.encryptBatch([{ keyId, plaintext: Buffer.from('b') }, { keyId, plaintext: Buffer.from('c') }]);
  const bad = r.find((x) => !x.ok);
  if (bad) throw bad.error;
});
await record('create', () => kms.createDekForThread('thread-after-failure'));
await record('getWrapped', () => kms.getWrappedDek(keyId));
const health = await kms.health();
await kms.close();
process.stdout.write(JSON.stringify({ outcomes, ok: health.ok, limit }));
`,
  );
  const out = await runProcess(t, '/bin/bash', [
    '-c',
    `trap "" XFSZ; exec ${JSON.stringify(process.execPath)} --import=tsx ${JSON.stringify(script)} "$@"`,
    'bash',
    fixture.dataDir,
    fixture.keyFile,
    dek.keyId,
  ]).catch((err: Error) => {
    t.fail(err.message);
    return '{}';
  });
  const { outcomes, ok, limit } = JSON.parse(out) as {
    outcomes: [string, string][];
    ok: boolean;
    limit: number;
  };
  const firstFailure = outcomes.findIndex(([, code]) => code !== 'ok');
  t.true(firstFailure > 0, 'some operations succeeded before the limit');
  for (const [op, code] of outcomes.slice(firstFailure)) t.is(code, 'AUDIT_WRITE_FAILED', op);
  t.false(ok, 'health reports the failure');
  t.true(fs.statSync(auditPath(fixture.dataDir)).size <= limit);

  // The log up to the failure is intact apart from the torn tail, and the data dir still works.
  const kms = await fixture.reopen();
  t.deepEqual(await kms.decrypt(dek.keyId, earlier.ciphertext), Buffer.from('written before'));
  t.is((await kms.createDekForThread('thread-fail')).keyId, dek.keyId);
});
