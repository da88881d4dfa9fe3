/**
 * The benchmark harness runs and reports in the agreed shape. Only the shape is checked: speed is
 * never a test assertion (the machine is shared; the lead runs the full benchmark on a quiet one).
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import test from 'ava';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
// bench/ is not built: it runs as TypeScript, measuring the built package in dist/ (npm test builds it).
const RUNNER = path.join(ROOT, 'bench/run.ts');

function runBench(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('PROGRESSDB_')) env[k] = v;
  const child = spawn(process.execPath, ['--import=tsx', RUNNER, ...args], { cwd: ROOT, env });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d));
  child.stderr.on('data', (d: Buffer) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  // 'close', not 'exit': 'exit' can come before the last of stdout (the JSON line) is read.
  return new Promise((resolve) =>
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    }),
  );
}

test('bench --quick --only audit prints one JSON summary as its last stdout line', async (t) => {
  const { code, stdout, stderr } = await runBench([
    '--quick',
    '--only',
    'audit',
    '--rounds',
    '2',
    '--ms',
    '150',
  ]);
  t.is(code, 0, stderr);
  t.regex(stderr, /case 6 audit: running/);
  t.regex(stderr, /case 6 audit: done in/);
  const last = stdout.trimEnd().split('\n').at(-1)!;
  const summary = JSON.parse(last) as Record<string, unknown>;
  t.is(summary.quick, true);
  const entries = Object.entries(summary).filter(([k]) => k !== 'quick');
  t.true(entries.length >= 1);
  for (const [id, value] of entries) {
    const v = value as Record<string, unknown>;
    t.deepEqual(Object.keys(v).sort(), ['better', 'met', 'ratio', 'target'], id);
    t.is(typeof v.ratio, 'number', id);
    t.true(Number.isFinite(v.ratio as number) && (v.ratio as number) > 0, id);
    t.is(typeof v.target, 'number', id);
    t.true(v.better === 'higher' || v.better === 'lower', id);
    t.is(typeof v.met, 'boolean', id);
  }
  t.truthy(summary.audit_on_vs_off);
});

test('bench rejects an --only that names no case', async (t) => {
  const { code, stderr } = await runBench(['--quick', '--only', 'no-such-case']);
  t.is(code, 2);
  t.regex(stderr, /matched no case/);
});
