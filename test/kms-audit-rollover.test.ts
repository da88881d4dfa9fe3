/**
 * Audit log rollover: by size under concurrent load from several workers (no line lost or torn,
 * each stream's chain going on across files), verification of the rolled files as one chain
 * naming the file and line of the first problem (tampering, a missing or moved file), expiry of
 * the oldest files with --from, and SIGHUP reopening after a logrotate-style rename.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import test from 'ava';
import type { VerifyAuditResult } from '../src/api/index.js';
import type { AuditHeadRecord } from '../src/audit-link.js';
import { auditVerifyCommand } from '../src/cli/kms-commands/audit-verify.js';
import { resolveKmsOptions } from '../src/config/library.js';
import { AUDIT_FILE_NAME, auditChainFiles, rolledAuditFiles } from '../src/kms/audit-file.js';
import { createKms } from '../src/kms/index.js';
import { Registry } from '../src/kms/registry/index.js';
import { verifyAuditFiles } from '../workers/audit-verify-files.js';
import { loadRootKeys } from '../workers/master-key.js';
import { captureStdout, tempDir, writeMasterKey } from './helpers/kms.js';
import { b64, postJson, spawnDaemon } from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';
import { KMS_CLI, runCli } from './helpers/server.js';

const MAX_BYTES = 4096;

interface RolledLog {
  dataDir: string;
  keyFile: string;
  head: AuditHeadRecord | null;
  /** Lines of each file of the chain, by file name. */
  files: Map<string, string[]>;
}

function linesOf(file: string): string[] {
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  if (lines.at(-1) === '') lines.pop();
  return lines;
}

const sharedDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pdb-kms-roll-'));
test.after.always(() => fs.rmSync(sharedDir, { recursive: true, force: true }));

// The tests that capture the CLI's stdout run one at a time (test.serial).

/**
 * One KMS with three workers and a 4 KiB rollover size, under waves of concurrent encrypts on
 * several keys (so each file holds blocks of every worker); verified live, then closed. Shared by the tests, which check copies of its files.
 */
const rolled: Promise<RolledLog & { live: VerifyAuditResult }> = (async () => {
  const { file: keyFile } = writeMasterKey(sharedDir);
  const dataDir = path.join(sharedDir, 'kms');
  const kms = await createKms({
    dataDir,
    masterKeyFile: keyFile,
    poolSize: 3,
    auditMaxBytes: MAX_BYTES,
    auditFsyncMs: 5,
    // A line per encrypt: the volume that fills files fast enough to roll over many times.
    auditDataOps: 'each',
  });
  const keys = await Promise.all([0, 1, 2, 3].map((i) => kms.createDekForThread(`thread-roll-${i}`)));
  // Waves of 24 ops: each is split between the three workers (8 ops, one block, each).
  for (let wave = 0; wave < 15; wave++) {
    await Promise.all(
      Array.from({ length: 24 }, (_, i) =>
        kms.encrypt(keys[i % keys.length]?.keyId ?? '', Buffer.from(`wave ${wave} op ${i}`)),
      ),
    );
  }
  const live = await kms.verifyAudit();
  await kms.close();
  const files = new Map(auditChainFiles(dataDir).map((f) => [path.basename(f), linesOf(f)]));
  return { dataDir, keyFile, head: Registry.readAuditHead(dataDir) ?? null, files, live };
})();

/** A copy of the rolled log's files, `edit`ed (file name → its lines, or undefined to drop it). */
function copyWith(
  t: Parameters<typeof tempDir>[0],
  log: RolledLog,
  edit: (files: Map<string, string[]>) => Map<string, string[]> = (f) => f,
): string {
  const dir = tempDir(t);
  for (const [name, lines] of edit(new Map(log.files))) {
    fs.writeFileSync(path.join(dir, name), lines.length === 0 ? '' : `${lines.join('\n')}\n`);
  }
  return dir;
}

function verifyCopy(log: RolledLog, dir: string, from?: string) {
  const { auditKey } = loadRootKeys({ kind: 'file', path: log.keyFile });
  try {
    return verifyAuditFiles(auditKey, auditChainFiles(dir, from), log.head, from !== undefined);
  } finally {
    auditKey.fill(0);
  }
}

/** The 1-based line where the block holding line `i` (0-based) of `lines` starts. */
function blockStart(lines: readonly string[], i: number): number {
  const s = (JSON.parse(lines[i] as string) as { s: string }).s;
  let start = i;
  for (let j = i - 1; j >= 0; j--) {
    const record = JSON.parse(lines[j] as string) as { s: string; mac?: string };
    if (record.s !== s) continue;
    if (record.mac !== undefined) break;
    start = j;
  }
  return start + 1;
}

test.serial(
  'the log rolls over under concurrent load; every line lands whole and the chain verifies',
  async (t) => {
    const log = await rolled;
    t.true(log.live.ok, log.live.reason ?? '');
    const rolledNames = rolledAuditFiles(log.dataDir);
    t.true(rolledNames.length >= 3, `rolled ${rolledNames.length} times`);
    t.deepEqual(
      rolledNames,
      rolledNames.map((_, i) => `${AUDIT_FILE_NAME}.${String(i + 1).padStart(6, '0')}`),
    );
    for (const name of rolledNames) {
      t.true(fs.statSync(path.join(log.dataDir, name)).size >= MAX_BYTES, `${name} passed the limit`);
    }
    // Whole lines only, and each stream's sequence runs on across files without a gap.
    const next = new Map<string, number>();
    const filesOf = new Map<string, Set<string>>();
    for (const [name, lines] of log.files) {
      for (const line of lines) {
        const record = JSON.parse(line) as { s: string; n: number; prev_mac?: string };
        t.is(record.n, next.get(record.s) ?? 0, `${name}: stream ${record.s} in order`);
        const first = !filesOf.get(record.s)?.has(name);
        // A stream's first line in a later file names the MAC its chain goes on from.
        if (first && record.n > 0) t.regex(record.prev_mac ?? '', /^[0-9a-f]{64}$/, `${name}: anchor`);
        next.set(record.s, record.n + 1);
        filesOf.set(record.s, (filesOf.get(record.s) ?? new Set()).add(name));
      }
    }
    t.true(next.size >= 2, 'several workers wrote');
    t.true(
      [...filesOf.values()].some((names) => names.size >= 3),
      'a stream went on across files',
    );
    const ops = [...log.files.values()].flat().filter((l) => l.includes('"op":"encrypt"'));
    t.is(ops.length, 360, 'one line per encrypt');

    const { result, out } = await captureStdout(() =>
      auditVerifyCommand({ dataDir: log.dataDir, masterKeyFile: log.keyFile }),
    );
    t.is(result, 0, out);
    const total = [...log.files.values()].reduce((sum, lines) => sum + lines.length, 0);
    t.regex(out, new RegExp(`^ok: ${total} lines verified in ${log.files.size} files`, 'm'));
  },
);

test.serial('a tampered line in a rolled file is reported with that file and line', async (t) => {
  const log = await rolled;
  const name = `${AUDIT_FILE_NAME}.000002`;
  const original = log.files.get(name) ?? [];
  const at = Math.floor(original.length / 2);
  const dir = copyWith(t, log, (files) =>
    files.set(
      name,
      original.map((line, i) => (i === at ? line.replace('"outcome":"ok"', '"outcome":"error"') : line)),
    ),
  );
  const verdict = verifyCopy(log, dir);
  t.false(verdict.ok);
  t.is(verdict.file, path.join(dir, name));
  t.is(verdict.firstBadLine, blockStart(original, at), verdict.reason ?? '');
  t.regex(verdict.reason ?? '', /^kms-audit\.log\.000002: signature mismatch/);

  const { result, out } = await captureStdout(() =>
    auditVerifyCommand({ dataDir: dir, masterKeyFile: log.keyFile }),
  );
  t.is(result, 1);
  t.regex(out, new RegExp(`^FAILED at ${path.join(dir, name)}:${verdict.firstBadLine}: `, 'm'));
  t.regex(out, new RegExp(`^in file: ${path.join(dir, name)}$`, 'm'));
});

/** Streams (ids) with lines in each file. */
function streamsOf(lines: readonly string[]): Set<string> {
  return new Set(lines.map((line) => (JSON.parse(line) as { s: string }).s));
}

/** The file where some stream's sequence first jumps, reading `files` in order. */
function firstGap(files: Map<string, string[]>): string | undefined {
  const next = new Map<string, number>();
  for (const [name, lines] of files) {
    for (const line of lines) {
      const { s, n } = JSON.parse(line) as { s: string; n: number };
      if (n !== (next.get(s) ?? 0)) return name;
      next.set(s, n + 1);
    }
  }
  return undefined;
}

test('a missing middle file or files out of order break the chain', async (t) => {
  const log = await rolled;
  const withoutMiddle = (files: Map<string, string[]>) => {
    files.delete(`${AUDIT_FILE_NAME}.000002`);
    return files;
  };
  const missing = copyWith(t, log, withoutMiddle);
  const gap = verifyCopy(log, missing);
  t.false(gap.ok);
  t.regex(gap.reason ?? '', /expected line \d+, found \d+/);
  t.is(gap.file, path.join(missing, firstGap(withoutMiddle(new Map(log.files))) ?? ''));

  // Two rolled neighbours that share a stream, swapped (files of disjoint streams have no order).
  const names = rolledAuditFiles(log.dataDir);
  const at = names.findIndex((name, i) => {
    const mine = streamsOf(log.files.get(name) ?? []);
    return [...streamsOf(log.files.get(names[i + 1] ?? '') ?? [])].some((s) => mine.has(s));
  });
  t.true(at >= 0, 'neighbouring files share a stream');
  const [a, b] = [names[at] ?? '', names[at + 1] ?? ''];
  const swapped = copyWith(t, log, (files) => {
    const first = files.get(a) ?? [];
    files.set(a, files.get(b) ?? []);
    files.set(b, first);
    return files;
  });
  const moved = verifyCopy(log, swapped);
  t.false(moved.ok);
  t.is(moved.file, path.join(swapped, a));
});

test.serial(
  'the oldest files may expire: the chain then verifies from the first one kept, told so',
  async (t) => {
    const log = await rolled;
    const firstKept = `${AUDIT_FILE_NAME}.000003`;
    const expire = (files: Map<string, string[]>) => {
      files.delete(`${AUDIT_FILE_NAME}.000001`);
      files.delete(`${AUDIT_FILE_NAME}.000002`);
      return files;
    };
    const expired = copyWith(t, log, expire);
    const strict = verifyCopy(log, expired);
    t.false(strict.ok, 'not without being told');
    t.regex(strict.reason ?? '', /see --from|not in the log/);
    const trimmed = verifyCopy(log, expired, firstKept);
    t.true(trimmed.ok, trimmed.reason ?? '');

    // Every kept line is still checked: the first block of a stream taken up from its anchor too.
    const kept = log.files.get(firstKept) ?? [];
    const tampered = copyWith(t, log, (files) =>
      expire(files).set(
        firstKept,
        kept.map((line, i) => (i === 0 ? line.replace('"op":"encrypt"', '"op":"decrypt"') : line)),
      ),
    );
    const edited = verifyCopy(log, tampered, firstKept);
    t.false(edited.ok);
    t.is(edited.file, path.join(tampered, firstKept));
    t.is(edited.firstBadLine, 1, edited.reason ?? '');

    // And a file missing after the first kept one is still a gap.
    const gap = copyWith(t, log, (files) => {
      expire(files).delete(`${AUDIT_FILE_NAME}.000004`);
      return files;
    });
    t.false(verifyCopy(log, gap, firstKept).ok);

    const { result, out } = await captureStdout(() =>
      auditVerifyCommand({ dataDir: expired, masterKeyFile: log.keyFile, from: firstKept }),
    );
    t.is(result, 0, out);
    const unknown = await captureStdout(() =>
      auditVerifyCommand({ dataDir: expired, masterKeyFile: log.keyFile, from: 'kms-audit.log.000001' }),
    );
    t.is(unknown.result, 1, 'an expired file cannot be the start');
  },
);

test('auditMaxBytes: 0 turns rollover off; below 4096 is refused; the default is 128 MiB', (t) => {
  const base = { dataDir: '/tmp/unused', masterKeyFile: '/tmp/unused.key' };
  t.is(resolveKmsOptions(base).auditMaxBytes, 128 * 1024 * 1024);
  t.is(resolveKmsOptions({ ...base, auditMaxBytes: 0 }).auditMaxBytes, null);
  t.throws(() => resolveKmsOptions({ ...base, auditMaxBytes: 100 }), { code: 'CONFIG_INVALID' });
});

test('SIGHUP after a logrotate-style rename: new lines go to a new file, the chain verifies', async (t) => {
  const daemon = await spawnDaemon({ env: { PROGRESSDB_KMS_POOL_SIZE: '2' } });
  t.teardown(() => daemon.kill9());
  const base = `http://${daemon.http}`;
  const created = await postJson(base, '/create_dek_for_thread', { thread_id: 'thread-hup' });
  t.is(created.status, 200);
  const encrypt = async (label: string) => {
    const replies = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        postJson(base, '/encrypt', { key_id: created.json.key_id, plaintext: b64(`${label} ${i}`) }),
      ),
    );
    for (const r of replies) t.is(r.status, 200);
  };
  await encrypt('before');
  // logrotate with `dateext` and `create`: rename, make the new empty file, then HUP.
  const live = path.join(daemon.dataDir, AUDIT_FILE_NAME);
  const rotated = `${live}.20261203101500`;
  fs.renameSync(live, rotated);
  fs.writeFileSync(live, '', { mode: 0o600 });
  process.kill(daemon.child.pid ?? 0, 'SIGHUP');
  await until('the reopen', () =>
    daemon.logs.some((l) => l.includes('audit log reopened')) ? true : undefined,
  );
  const rotatedSize = fs.statSync(rotated).size;
  await encrypt('after');
  t.is(fs.statSync(rotated).size, rotatedSize, 'nothing more went to the rotated file');
  // Each file accounts for its 20 encrypts (aggregated lines carry their count).
  const encrypts = (file: string) =>
    linesOf(file)
      .map((l) => JSON.parse(l) as { op: string; count?: number })
      .filter((l) => l.op === 'encrypt')
      .reduce((sum, l) => sum + (l.count ?? 1), 0);
  t.is(encrypts(live), 20);
  t.is(encrypts(rotated), 20);

  // Beside the live daemon, then once it stopped (its stop line sealing both streams).
  const args = ['audit', 'verify', '--data-dir', daemon.dataDir, '--master-key-file', daemon.masterKeyFile];
  const running = await runCli(KMS_CLI, args);
  t.is(running.code, 0, running.stdout + running.stderr);
  t.regex(running.stdout, /lines verified in 2 files/);
  t.is((await daemon.stop()).code, 0);
  const stopped = await runCli(KMS_CLI, args);
  t.is(stopped.code, 0, stopped.stdout + stopped.stderr);
});
