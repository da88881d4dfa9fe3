/**
 * Signed audit checkpoints: written every N lines and at a clean stop, and `audit verify
 * --public-key` checking them with no master key, telling a tampered log, a wrong key and a cut-off
 * end apart. A KMS without a signing key writes none.
 */
import fs from 'node:fs';
import path from 'node:path';
import test, { type ExecutionContext } from 'ava';
import { parsePublicKey, SIGNING_KEY_FILE_LABEL } from '../src/audit-checkpoint.js';
import { auditVerifyPublicCommand } from '../src/cli/kms-commands/audit-verify-public.js';
import { createKms } from '../src/kms/index.js';
import { generateAuditSigningKey } from '../src/kms/keygen.js';
import { verifyAuditPublic } from '../src/kms/verify-audit-public.js';
import {
  type AuditLine,
  auditLines,
  auditPath,
  auditText,
  captureStdout,
  expectCode,
  openKms,
  ROOT,
  startChild,
  tempDir,
  writeScript,
} from './helpers/kms.js';

type CheckpointLine = AuditLine & { covers: number; hash: string; signing_key: string; sig: string };

async function signingKey(t: ExecutionContext, name = 'audit-signing.key') {
  const file = path.join(tempDir(t), name);
  const { publicKeyFile, keyId } = await generateAuditSigningKey(file);
  return { file, publicKeyFile, keyId };
}

/** A KMS with a signing key (checkpoint every `lines` lines) that ran `ops` encrypts and stopped. */
async function signedLog(t: ExecutionContext, lines: number, ops: number) {
  const key = await signingKey(t);
  const fixture = await openKms(t, {
    auditSigningKeyFile: key.file,
    auditCheckpointLines: lines,
    auditDataOps: 'each',
  });
  const dek = await fixture.kms.createDekForThread('thread-cp');
  for (let i = 0; i < ops; i++) await fixture.kms.encrypt(dek.keyId, Buffer.from(`m${i}`));
  await fixture.kms.close();
  return { ...fixture, key };
}

/** Runs the CLI command on `dataDir` with the given public key files. */
async function verifyCli(dataDir: string, publicKey: string[], extra: { registry?: boolean } = {}) {
  const { result, out } = await captureStdout(() =>
    auditVerifyPublicCommand({ dataDir, publicKey, ...extra }),
  );
  return { code: result, out };
}

test('keygen --audit-signing-key writes a 0600 private key and a PEM public key, never overwriting', async (t) => {
  const { file, publicKeyFile, keyId } = await signingKey(t);
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  const text = fs.readFileSync(file, 'latin1');
  t.true(text.startsWith(SIGNING_KEY_FILE_LABEL));
  t.regex(text.slice(SIGNING_KEY_FILE_LABEL.length), /^[0-9a-f]{64}\n$/);
  const pem = fs.readFileSync(publicKeyFile, 'utf8');
  t.true(pem.startsWith('-----BEGIN PUBLIC KEY-----'));
  t.is(parsePublicKey(pem)?.length, 32);
  t.regex(keyId, /^[0-9a-f]{32}$/);
  await expectCode(t, generateAuditSigningKey(file), 'CONFIG_INVALID');
});

test('checkpoints appear every N lines and at stop, and verify with the public key alone', async (t) => {
  const { dataDir, key, keyFile } = await signedLog(t, 5, 12);
  const lines = auditLines(dataDir);
  const checkpoints = lines.filter((l) => l.op === 'checkpoint') as CheckpointLine[];
  // Lines since the last checkpoint never reach 5 plus one block (a task's lines are one block).
  let since = 0;
  for (const line of lines as CheckpointLine[]) {
    if (line.op === 'checkpoint') {
      t.is(line.covers, line.n - 1);
      t.is(line.signing_key, key.keyId);
      t.truthy(line.mac, 'a checkpoint is a signed block of its own');
      since = 0;
    } else since++;
    t.true(since <= 5, `at line ${line.n}`);
  }
  t.true(checkpoints.length >= 3, `${checkpoints.length} checkpoints`);
  // The stop line is checkpointed at once: it is the last line but the checkpoint after it.
  t.is(lines.at(-2)?.op, 'stop');
  t.is(lines.at(-1)?.op, 'checkpoint');
  // No master key anywhere: the key file is gone, and the verifier runs in this thread.
  fs.rmSync(keyFile);
  const { code, out } = await verifyCli(dataDir, [key.publicKeyFile]);
  t.is(code, 0, out);
  t.regex(
    out,
    new RegExp(
      `^ok: ${checkpoints.length} checkpoints verified, covering ${lines.length} of ${lines.length} lines`,
    ),
  );
  t.notRegex(out, /not covered/);
});

test('a flipped byte in a covered line is reported as tampered, naming its file and range', async (t) => {
  const { dataDir, key } = await signedLog(t, 5, 12);
  const text = auditText(dataDir);
  // An encrypt line covered by a later checkpoint: its key id altered in one hex digit.
  const target = text.findIndex((l, i) => i > 2 && l.includes('"op":"encrypt"'));
  const line = text[target] as string;
  const at = line.indexOf('"key_id":"dek_') + 14;
  text[target] = line.slice(0, at) + (line[at] === 'a' ? 'b' : 'a') + line.slice(at + 1);
  fs.writeFileSync(auditPath(dataDir), `${text.join('\n')}\n`);
  const { code, out } = await verifyCli(dataDir, [key.publicKeyFile]);
  t.is(code, 1);
  const match = /^FAILED \(tampered\) at (.+):(\d+): stream \w+: lines (\d+) to (\d+) do not match/.exec(out);
  t.truthy(match, out);
  t.is(match?.[1], auditPath(dataDir));
  t.true(Number(match?.[3]) <= target + 1 && target + 1 <= Number(match?.[4]), out);
});

test("another key pair's public key is reported as the wrong key, not as tampering", async (t) => {
  const { dataDir } = await signedLog(t, 5, 6);
  const other = await signingKey(t, 'other.key');
  const { code, out } = await verifyCli(dataDir, [other.publicKeyFile]);
  t.is(code, 1);
  t.regex(
    out,
    /^FAILED \(wrong key\) at .+: the checkpoint is signed by key [0-9a-f]{32}; the public key given is /,
  );
  t.true(out.includes(other.keyId));
});

test('blocks cut off the end are reported as truncated with the registry, not without it', async (t) => {
  const { dataDir, key } = await signedLog(t, 5, 12);
  const text = auditText(dataDir);
  // Cut back to just after an earlier checkpoint: what is left verifies on its own.
  const checkpointAt = text.map((l, i) => (l.includes('"op":"checkpoint"') ? i : -1)).filter((i) => i >= 0);
  const keep = checkpointAt.at(-3) as number;
  fs.writeFileSync(auditPath(dataDir), `${text.slice(0, keep + 1).join('\n')}\n`);
  const cut = await verifyCli(dataDir, [key.publicKeyFile]);
  t.is(cut.code, 1);
  t.regex(
    cut.out,
    /^FAILED \(truncated\): the registry records a checkpoint of stream \w+ up to its line \d+; the log's last is up to line \d+ \(lines cut off the end\)/,
  );
  const alone = await verifyCli(dataDir, [key.publicKeyFile], { registry: false });
  t.is(alone.code, 0, alone.out);
  t.regex(alone.out, /without the registry's audit head/);
});

test('lines after the last checkpoint are reported as not covered yet, not as an error', async (t) => {
  const key = await signingKey(t);
  const { kms, dataDir } = await openKms(t, {
    auditSigningKeyFile: key.file,
    auditCheckpointLines: 4,
    auditDataOps: 'each',
  });
  const dek = await kms.createDekForThread('thread-open');
  for (let i = 0; i < 5; i++) await kms.encrypt(dek.keyId, Buffer.from('x'));
  // The KMS is still running: its last lines are not checkpointed yet.
  const lines = auditLines(dataDir);
  const last = lines.findLastIndex((l) => l.op === 'checkpoint');
  t.true(last > 0 && last < lines.length - 1);
  const result = verifyAuditPublic(
    [auditPath(dataDir)],
    [parsePublicKey(fs.readFileSync(key.publicKeyFile, 'utf8')) as Buffer],
    null,
  );
  t.true(result.ok, result.reason ?? '');
  t.is(result.linesUncovered, lines.length - 1 - last);
  t.is(result.linesCovered, last + 1);
});

test('a KMS without a signing key writes no checkpoints and verifies as before', async (t) => {
  const { kms, dataDir, reopen } = await openKms(t, { auditDataOps: 'each' });
  const dek = await kms.createDekForThread('thread-plain');
  for (let i = 0; i < 10; i++) await kms.encrypt(dek.keyId, Buffer.from('x'));
  await kms.close();
  const lines = auditLines(dataDir);
  t.false(lines.some((l) => l.op === 'checkpoint' || 'prev_hash' in l));
  t.is(lines.at(-1)?.op, 'stop');
  const again = await reopen();
  const result = await again.verifyAudit();
  t.true(result.ok, result.reason ?? '');
  const key = await signingKey(t);
  const { code, out } = await verifyCli(dataDir, [key.publicKeyFile]);
  t.is(code, 1);
  t.regex(out, /^FAILED \(no checkpoints\): the log holds no signed checkpoint/);
});

test('the MAC verifier accepts a signed log (checkpoints, the stop line checkpointed) across restarts', async (t) => {
  const { dataDir, key, reopen } = await signedLog(t, 3, 7);
  const kms = await reopen({ auditSigningKeyFile: key.file, auditCheckpointLines: 3 });
  const dek = await kms.createDekForThread('thread-again');
  await kms.encrypt(dek.keyId, Buffer.from('y'));
  const result = await kms.verifyAudit();
  t.true(result.ok, result.reason ?? '');
  await kms.close();
  const { code, out } = await verifyCli(dataDir, [key.publicKeyFile]);
  t.is(code, 0, out);
});

test('a signing key file that is not one keygen made fails the start', async (t) => {
  const dir = tempDir(t);
  const bad = path.join(dir, 'bad.key');
  fs.writeFileSync(bad, `${'ab'.repeat(32)}\n`, { mode: 0o600 });
  const { dataDir, keyFile } = { dataDir: path.join(dir, 'kms'), keyFile: path.join(dir, 'master.key') };
  fs.writeFileSync(keyFile, `${'cd'.repeat(32)}\n`, { mode: 0o600 });
  await expectCode(
    t,
    createKms({ dataDir, masterKeyFile: keyFile, poolSize: 1, auditSigningKeyFile: bad }),
    'AUDIT_SIGNING_KEY_INVALID',
  );
});

test('an idle worker checkpoints its last lines once auditCheckpointMs has passed', async (t) => {
  const key = await signingKey(t);
  const { kms, dataDir } = await openKms(t, {
    poolSize: 2,
    auditSigningKeyFile: key.file,
    auditCheckpointLines: 1_000_000,
    auditCheckpointMs: 200,
    auditDataOps: 'each',
  });
  const dek = await kms.createDekForThread('thread-idle');
  await kms.encrypt(dek.keyId, Buffer.from('x'));
  // Nothing more is asked of the KMS: only its checkpoint rounds can cover these lines.
  // Polled until every stream's lines are covered, or 10 s (50 rounds) have passed.
  const publicKey = parsePublicKey(fs.readFileSync(key.publicKeyFile, 'utf8')) as Buffer;
  const deadline = Date.now() + 10_000;
  let result = verifyAuditPublic([auditPath(dataDir)], [publicKey], null);
  while ((!result.ok || result.linesUncovered > 0) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    result = verifyAuditPublic([auditPath(dataDir)], [publicKey], null);
  }
  const lines = auditLines(dataDir);
  t.true(result.ok, result.reason ?? '');
  t.is(lines.at(-1)?.op, 'checkpoint');
  t.is(result.linesUncovered, 0, 'every line is covered');
  t.is(result.linesCovered, lines.length);
});

test('the hash chain goes on across rolled files, and from a later file when older ones expired', async (t) => {
  const key = await signingKey(t);
  const { kms, dataDir } = await openKms(t, {
    auditSigningKeyFile: key.file,
    auditCheckpointLines: 5,
    auditMaxBytes: 4096,
    auditDataOps: 'each',
  });
  const dek = await kms.createDekForThread('thread-roll');
  for (let i = 0; i < 80; i++) await kms.encrypt(dek.keyId, Buffer.from('x'));
  await kms.close();
  const rolled = fs
    .readdirSync(dataDir)
    .filter((f) => /^kms-audit\.log\.\d+$/.test(f))
    .sort();
  t.true(rolled.length >= 2, `${rolled.length} rolled files`);
  const all = await verifyCli(dataDir, [key.publicKeyFile]);
  t.is(all.code, 0, all.out);
  t.regex(all.out, new RegExp(`in ${rolled.length + 1} files`));
  fs.rmSync(path.join(dataDir, rolled[0] as string));
  const from = await captureStdout(() =>
    auditVerifyPublicCommand({ dataDir, publicKey: [key.publicKeyFile], from: rolled[1] as string }),
  );
  t.is(from.result, 0, from.out);
});

test('through the command line: keygen --audit-signing-key, then audit verify --public-key exits 0, 1 with another key', async (t) => {
  const dir = tempDir(t);
  const cli = path.join(ROOT, 'src/cli/progressdb-kms.ts');
  const script = writeScript(dir, 'cli', `await import(${JSON.stringify(cli)});\n`);
  const keyFile = path.join(dir, 'signing.key');
  const made = await startChild(t, script, ['keygen', '--audit-signing-key', keyFile]).exited;
  t.is(made.code, 0, made.stderr);
  t.regex(made.stderr, /key id [0-9a-f]{32}/);
  const again = await startChild(t, script, ['keygen', '--audit-signing-key', keyFile]).exited;
  t.is(again.code, 1, 'never overwrites');
  const { kms, dataDir } = await openKms(t, { auditSigningKeyFile: keyFile, auditCheckpointLines: 3 });
  const dek = await kms.createDekForThread('thread-cli');
  for (let i = 0; i < 4; i++) await kms.encrypt(dek.keyId, Buffer.from('x'));
  await kms.close();
  const verifyArgs = ['audit', 'verify', '--data-dir', dataDir, '--public-key'];
  const ok = await startChild(t, script, [...verifyArgs, `${keyFile}.pub`]).exited;
  t.is(ok.code, 0, ok.stderr);
  t.regex(ok.stdout, /^ok: \d+ checkpoints verified/);
  const other = path.join(dir, 'other.key');
  await generateAuditSigningKey(other);
  const wrong = await startChild(t, script, [...verifyArgs, `${other}.pub`, '--no-registry']).exited;
  t.is(wrong.code, 1);
  t.regex(wrong.stdout, /^FAILED \(wrong key\)/);
  // Both keys given (a replaced signing key): the log's own is among them.
  const both = await startChild(t, script, [...verifyArgs, `${other}.pub`, '--public-key', `${keyFile}.pub`])
    .exited;
  t.is(both.code, 0, both.stdout);
});
