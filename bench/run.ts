/**
 * Issue-5 benchmark harness: every hot path against a baseline measured in the same run,
 * alternating the two, medians of several rounds.
 *
 *   npm run bench                 every case (100k DEKs for rotation and start-up); writes
 *                                 bench/results/latest.{json,md,svg}
 *   npm run bench -- --full       adds 1,000,000 DEKs for rotation and start-up
 *   npm run bench -- --quick      reduced set in under a minute; writes no files
 *   --only a,b                    only these cases (by name or number, e.g. --only audit,2);
 *                                 writes no files. Names: embedded tcp http peer rotation audit
 *                                 server startup cluster
 *   --rounds N --ms N             override rounds per comparison and the timed window
 *   --out DIR                     where to write results (default bench/results; quick and
 *                                 --only runs write only when --out is given)
 *
 * Exit code 1 when a case could not run (e.g. a daemon missing); missed targets do not fail.
 *
 * Progress goes to stderr, one line per case (plus per-round detail). The last stdout line is one
 * JSON object: {"quick":bool,"<metric id>":{"ratio","target","better","met"},...}.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import * as audit from './cases/audit.js';
import * as cluster from './cases/cluster.js';
import * as embedded from './cases/embedded.js';
import * as http from './cases/http.js';
import * as peer from './cases/peer.js';
import * as rotation from './cases/rotation.js';
import * as server from './cases/server.js';
import * as startup from './cases/startup.js';
import * as tcpBridge from './cases/tcp-bridge.js';
import { type BenchContext, type CaseReport, type Mode, REPO_ROOT } from './lib.js';
import { type CaseOutcome, markdownTable, svgChart } from './report.js';

interface CaseModule {
  caseNo: number;
  name: string;
  run(ctx: BenchContext): Promise<CaseReport>;
}

const CASES: CaseModule[] = [embedded, tcpBridge, http, peer, rotation, audit, server, startup, cluster];

const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    full: { type: 'boolean', default: false },
    only: { type: 'string' },
    rounds: { type: 'string' },
    ms: { type: 'string' },
    out: { type: 'string' },
  },
});
if (values.quick && values.full) {
  process.stderr.write('bench: --quick and --full exclude each other\n');
  process.exit(2);
}
const mode: Mode = values.quick ? 'quick' : values.full ? 'full' : 'normal';
const only = values.only?.split(',').map((s) => s.trim().toLowerCase()) ?? null;
const selected = CASES.filter(
  (c) => only === null || only.includes(c.name) || only.includes(String(c.caseNo)),
);
if (selected.length === 0) {
  process.stderr.write(`bench: --only matched no case; cases: ${CASES.map((c) => c.name).join(', ')}\n`);
  process.exit(2);
}

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'progressdb-bench-run-'));
let dirs = 0;
const runStart = performance.now();
const elapsed = () => ((performance.now() - runStart) / 1000).toFixed(1);
const ctx: BenchContext = {
  mode,
  rounds: Number(values.rounds ?? (mode === 'quick' ? 3 : 5)),
  ms: Number(values.ms ?? (mode === 'quick' ? 250 : 1000)),
  sizes: mode === 'quick' ? [1024] : [1024, 64, 16 * 1024],
  progress: (message) => process.stderr.write(`[${elapsed()}s] ${message}\n`),
  tmp: (prefix) => fs.mkdtempSync(path.join(tmpRoot, `${prefix}${dirs++}-`)),
  fixtures: new Map(),
};

const cleanup = () => fs.rmSync(tmpRoot, { recursive: true, force: true });
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    cleanup();
    process.exit(130);
  });
}

ctx.progress(
  `bench ${mode}: ${selected.length} case(s), ${ctx.rounds} rounds of ${ctx.ms} ms, ` +
    `${os.availableParallelism()} CPUs, node ${process.version}`,
);
const outcomes: CaseOutcome[] = [];
for (const [i, c] of selected.entries()) {
  const head = `[${i + 1}/${selected.length}] case ${c.caseNo} ${c.name}`;
  ctx.progress(`${head}: running`);
  const t0 = performance.now();
  let report: CaseReport | null = null;
  let error: string | null = null;
  try {
    report = await c.run(ctx);
  } catch (err) {
    error = err instanceof Error ? err.message : String(err);
  }
  const seconds = (performance.now() - t0) / 1000;
  outcomes.push({ caseNo: c.caseNo, name: c.name, seconds, report, error });
  const summary =
    report === null
      ? `NOT RUN: ${error}`
      : report.metrics
          .map(
            (m) =>
              `${m.id} ${m.ratio}x (${m.better === 'higher' ? '>=' : '<='}${m.target} ${m.met ? 'met' : 'MISSED'})`,
          )
          .join('; ');
  ctx.progress(`${head}: done in ${seconds.toFixed(1)} s: ${summary}`);
}
cleanup();

const metrics = outcomes.flatMap((o) => o.report?.metrics ?? []);
const table = markdownTable(outcomes);
const command = `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`;
// Quick and --only runs are partial: they write files only when --out asks for them.
if ((mode !== 'quick' && only === null) || values.out !== undefined) {
  const outDir = path.resolve(values.out ?? path.join(REPO_ROOT, 'bench/results'));
  fs.mkdirSync(outDir, { recursive: true });
  const machine = {
    cpus: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    totalMemBytes: os.totalmem(),
    node: process.version,
    platform: `${os.platform()} ${os.release()}`,
  };
  const json = {
    command,
    mode,
    date: new Date().toISOString(),
    machine,
    rounds: ctx.rounds,
    windowMs: ctx.ms,
    totalSeconds: Number(elapsed()),
    cases: outcomes,
  };
  fs.writeFileSync(path.join(outDir, 'latest.json'), `${JSON.stringify(json, null, 2)}\n`);
  const header =
    `# ProgressDB benchmarks (${mode})\n\n` +
    `Command: \`${command}\` on ${json.date}, ${machine.cpus} CPUs (${machine.cpuModel}), node ${machine.node}.\n` +
    `Every ratio is against a baseline measured in the same run, alternating the two, median of ` +
    `${ctx.rounds} rounds.\n\n`;
  fs.writeFileSync(path.join(outDir, 'latest.md'), `${header}${table}`);
  fs.writeFileSync(
    path.join(outDir, 'latest.svg'),
    svgChart(metrics, `ProgressDB benchmarks (${mode}), ${json.date}`),
  );
  ctx.progress(`wrote ${path.relative(process.cwd(), outDir) || '.'}/latest.{json,md,svg}`);
}
ctx.progress(`total ${elapsed()} s`);

const last: Record<string, unknown> = { quick: mode === 'quick' };
for (const m of metrics) last[m.id] = { ratio: m.ratio, target: m.target, better: m.better, met: m.met };
for (const o of outcomes) if (o.report === null) last[o.name] = { error: o.error };
process.stdout.write(`${table}\n${JSON.stringify(last)}\n`);
// Children are gone and loops have ended; exit in case a library keeps a handle open. A case that
// could not run makes the exit code 1 (its error is in the summary), a missed target does not.
process.exit(outcomes.some((o) => o.report === null) ? 1 : 0);
