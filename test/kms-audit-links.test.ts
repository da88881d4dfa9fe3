/**
 * Audit sessions and worker streams are linked (src/audit-link.ts): removing or reordering whole
 * sessions, whole streams, the tail or the whole log makes `audit verify` fail, while the log of
 * clean restarts and of a kill -9 restart verifies.
 */
import fs from 'node:fs';
import test, { type ExecutionContext } from 'ava';
import { auditVerifyCommand } from '../src/cli/kms-commands/audit-verify.js';
import { createKms, type EmbeddedKmsHandle } from '../src/kms/index.js';
import { Registry } from '../src/kms/registry/index.js';
import { auditPath, auditText, captureStdout, openKms, startChild, writeScript } from './helpers/kms.js';
import { until } from './helpers/processes.js';

interface Line {
  s: string;
  n: number;
  op?: string;
  session?: string;
  mac?: string;
}

/** Spreads work over both workers so that each session has two streams. */
async function load(kms: EmbeddedKmsHandle, thread: string): Promise<void> {
  const { keyId } = await kms.createDekForThread(thread);
  await Promise.all(Array.from({ length: 64 }, (_, i) => kms.encrypt(keyId, Buffer.from(`${thread} ${i}`))));
}

/** Session number of every line (a stream's first line names it; its other lines follow it). */
function sessionsOf(raw: string[]): number[] {
  const ofStream = new Map<string, number>();
  return raw.map((text) => {
    const line = JSON.parse(text) as Line;
    if (line.session !== undefined) ofStream.set(line.s, Number(line.session));
    return ofStream.get(line.s) ?? 0;
  });
}

/** `progressdb-kms audit verify`; its stdout is captured, so the tests that call it run serially. */
async function verify(dataDir: string, keyFile: string): Promise<{ ok: boolean; out: string }> {
  const { result, out } = await captureStdout(() => auditVerifyCommand({ dataDir, masterKeyFile: keyFile }));
  return { ok: result === 0, out };
}

/** Three sessions, each with two streams; session 2 holds a destroy_dek. */
async function threeSessions(t: ExecutionContext) {
  const fixture = await openKms(t, { poolSize: 2 });
  await load(fixture.kms, 'first');
  await fixture.kms.close();
  const second = await fixture.reopen({ poolSize: 2 });
  await load(second, 'second');
  const doomed = await second.createDekForThread('doomed');
  await second.destroyDek(doomed.keyId);
  await second.close();
  const third = await fixture.reopen({ poolSize: 2 });
  await load(third, 'third');
  await third.close();
  return fixture;
}

test.serial(
  'a log of clean restarts verifies; removing or reordering sessions, streams or its end fails',
  async (t) => {
    const { dataDir, keyFile } = await threeSessions(t);
    const raw = auditText(dataDir);
    const sessions = sessionsOf(raw);
    t.deepEqual([...new Set(sessions)], [1, 2, 3], 'three numbered sessions, in order');
    for (const n of [1, 2, 3]) {
      const streams = new Set(raw.filter((_, i) => sessions[i] === n).map((l) => (JSON.parse(l) as Line).s));
      t.is(streams.size, 2, `session ${n} has two streams`);
    }
    t.true(raw.some((l, i) => sessions[i] === 2 && l.includes('"op":"destroy_dek"')));
    const intact = await verify(dataDir, keyFile);
    t.true(intact.ok, intact.out);

    const streamOf = (i: number) => (JSON.parse(raw[i]!) as Line).s;
    const secondStream = streamOf(raw.findLastIndex((_, i) => sessions[i] === 1));
    const otherStream = streamOf(raw.findIndex((_, i) => sessions[i] === 1 && streamOf(i) !== secondStream));
    const lastStop = raw.findLastIndex((l) => l.includes('"op":"stop"'));
    const cases: Record<string, string[]> = {
      'the whole log emptied': [],
      'session 2 (with the destroy_dek) removed': raw.filter((_, i) => sessions[i] !== 2),
      'the last session removed': raw.filter((_, i) => sessions[i] !== 3),
      'sessions 1 and 2 swapped': [
        ...raw.filter((_, i) => sessions[i] === 2),
        ...raw.filter((_, i) => sessions[i] === 1),
        ...raw.filter((_, i) => sessions[i] === 3),
      ],
      'one stream of session 1 removed': raw.filter(
        (_, i) => !(sessions[i] === 1 && streamOf(i) === otherStream),
      ),
      'the final stop line removed': raw.filter((_, i) => i !== lastStop),
    };
    for (const [what, lines] of Object.entries(cases)) {
      fs.writeFileSync(auditPath(dataDir), lines.length === 0 ? '' : `${lines.join('\n')}\n`);
      const result = await verify(dataDir, keyFile);
      t.false(result.ok, `${what}: ${result.out}`);
      t.regex(result.out, /^FAILED/m, what);
    }
    fs.rmSync(auditPath(dataDir));
    const missing = await verify(dataDir, keyFile);
    t.false(missing.ok, missing.out);
    t.regex(missing.out, /registry records lines/);

    // Put back, the original log verifies again: the failures were the edits.
    fs.writeFileSync(auditPath(dataDir), `${raw.join('\n')}\n`);
    t.true((await verify(dataDir, keyFile)).ok);
  },
);

test('a live KMS verifies its own log, and the first session of a new data dir is unlinked', async (t) => {
  const { kms, dataDir } = await openKms(t, { poolSize: 2 });
  await load(kms, 'live');
  t.true((await kms.verifyAudit()).ok);
  const first = JSON.parse(auditText(dataDir)[0]!) as Line & { prev_session?: string };
  t.is(first.session, '1');
  t.is(first.prev_session, '0');
});

test.serial('after kill -9 the next session links to what was saved, and the log verifies', async (t) => {
  const { dir, dataDir, keyFile } = await openKms(t, { poolSize: 2 }).then(async (f) => {
    await load(f.kms, 'before-crash');
    await f.kms.close();
    return f;
  });
  const script = writeScript(
    dir,
    'crash',
    `import { createKms } from 'KMS_MODULE';
const [dataDir, keyFile] = process.argv.slice(2);
const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2, auditFsyncMs: 5 });
const { keyId } = await kms.createDekForThread('crashing');
process.stdout.write('ready\\n');
for (;;) await Promise.all(Array.from({ length: 32 }, () => kms.encrypt(keyId, Buffer.from('x'))));
`,
  );
  const child = startChild(t, script, [dataDir, keyFile]);
  await until('the child is serving', () => (child.stdout().includes('ready') ? true : undefined));
  const size = fs.statSync(auditPath(dataDir)).size;
  // Long enough for several group fsyncs, so the registry holds heads of the crashing session.
  await until('the child wrote lines', () =>
    fs.statSync(auditPath(dataDir)).size > size + 200_000 ? true : undefined,
  );
  child.kill('SIGKILL');
  await child.exited;

  const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2 });
  t.teardown(() => kms.close());
  await load(kms, 'after-crash');
  const result = await kms.verifyAudit();
  t.true(result.ok, result.reason ?? '');
  const links = auditText(dataDir)
    .map((l) => JSON.parse(l) as Line & { prev_session?: string; prev_sealed?: string })
    .filter((l) => l.session === '3');
  t.true(links.length > 0);
  t.is(links[0]!.prev_session, '2', 'the crashed session is linked');
  t.is(links[0]!.prev_sealed, 'false', 'and known to have ended without a stop line');
  await kms.close();
  t.true((await verify(dataDir, keyFile)).ok);

  // The crashed session removed: the next one's link names lines that are gone.
  const raw = auditText(dataDir);
  const sessions = sessionsOf(raw);
  fs.writeFileSync(auditPath(dataDir), `${raw.filter((_, i) => sessions[i] !== 2).join('\n')}\n`);
  const cut = await verify(dataDir, keyFile);
  t.false(cut.ok, cut.out);
  t.regex(cut.out, /session 2/);
});

test('the last lines of a burst reach the registry head even when the KMS then goes idle', async (t) => {
  const { kms, dataDir } = await openKms(t);
  const { keyId } = await kms.createDekForThread('burst');
  const lastLine = () => JSON.parse(auditText(dataDir).at(-1)!) as Line;
  const headReaches = (line: Line) => () =>
    Registry.readAuditHead(dataDir)?.heads.some((h) => h.s === line.s && h.n >= line.n) ? true : undefined;
  await kms.encrypt(keyId, Buffer.from('first'));
  await until('the first save of the head', headReaches(lastLine()));
  // Written right after a save: its own save is due only after the minimum interval, with no
  // further writes to prompt it.
  await kms.encrypt(keyId, Buffer.from('last'));
  t.true(await until('the head to reach the last line', headReaches(lastLine()), 5_000));
});
