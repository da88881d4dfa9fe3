/**
 * Case 8: start-up time and RSS of createKms() in a fresh child process on a data dir holding N
 * DEKs (1,000,000 with --full; 100,000 otherwise, 20,000 in quick runs) against an initialised
 * empty data dir. Start-up must not grow with the number of keys; RSS must stay bounded.
 */
import path from 'node:path';
import {
  alternate,
  type BenchContext,
  type CaseReport,
  childScript,
  fmt,
  median,
  metric,
  round,
  seededDir,
  spawnNode,
} from '../lib.js';
import { createKms, generateMasterKeyFile } from '../product.js';

export const caseNo = 8;
export const name = 'startup';

interface StartupReading {
  startMs: number;
  rssBytes: number;
  heapUsedBytes: number;
  dekCount: number;
  sinceProcessStartMs: number;
}

async function startOnce(dataDir: string, masterKeyFile: string): Promise<StartupReading> {
  const child = spawnNode('startup child', childScript('startup'), [dataDir, masterKeyFile]);
  try {
    const reading = await child.jsonLine((l) =>
      typeof l.startMs === 'number' ? (l as unknown as StartupReading) : undefined,
    );
    const { code } = await child.exited;
    if (code !== 0) throw new Error(`startup child exited ${code}:\n${child.stderr.slice(-2000)}`);
    return reading;
  } finally {
    await child.stop();
  }
}

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const n = ctx.mode === 'full' ? 1_000_000 : ctx.mode === 'quick' ? 20_000 : 100_000;
  const seeded = await seededDir(ctx, n);
  const emptyDir = ctx.tmp('empty-');
  const emptyKey = path.join(emptyDir, 'master.key');
  await generateMasterKeyFile(emptyKey);
  const emptyData = path.join(emptyDir, 'kms');
  await (await createKms({ dataDir: emptyData, masterKeyFile: emptyKey })).close();

  const readings: Record<'empty' | 'seeded', StartupReading[]> = { empty: [], seeded: [] };
  const step = (which: 'empty' | 'seeded') => async () => {
    const r =
      which === 'empty'
        ? await startOnce(emptyData, emptyKey)
        : await startOnce(seeded.dataDir, seeded.masterKeyFile);
    const expected = which === 'empty' ? 0 : n;
    if (r.dekCount !== expected)
      throw new Error(`${which} data dir reports ${r.dekCount} DEKs, expected ${expected}`);
    readings[which].push(r);
    return r.startMs;
  };
  await step('empty')();
  await step('seeded')();
  readings.empty.length = 0;
  readings.seeded.length = 0;
  const rounds = Math.max(ctx.rounds, 3);
  await alternate(rounds, { empty: step('empty'), seeded: step('seeded') }, (r, last) =>
    ctx.progress(
      `  round ${r + 1}/${rounds}: start-up ${fmt(last.seeded, 1)} ms with ${fmt(n)} DEKs, ` +
        `${fmt(last.empty, 1)} ms empty; RSS ${fmt(readings.seeded.at(-1)!.rssBytes / 2 ** 20, 1)} MiB vs ` +
        `${fmt(readings.empty.at(-1)!.rssBytes / 2 ** 20, 1)} MiB`,
    ),
  );
  const med = (which: 'empty' | 'seeded', k: keyof StartupReading) =>
    median(readings[which].map((r) => r[k]));
  const label = n >= 1_000_000 ? '1m' : `${n / 1000}k`;
  return {
    metrics: [
      metric({
        id: `startup_time_${label}`,
        caseNo,
        title: `createKms() start-up with ${fmt(n)} DEKs vs empty data dir`,
        figure: med('seeded', 'startMs'),
        figureLabel: `${fmt(n)} DEKs`,
        baseline: med('empty', 'startMs'),
        baselineLabel: 'empty',
        unit: 'ms',
        target: 1.5,
        better: 'lower',
      }),
      metric({
        id: `startup_rss_${label}`,
        caseNo,
        title: `RSS after start-up with ${fmt(n)} DEKs vs empty data dir`,
        figure: med('seeded', 'rssBytes') / 2 ** 20,
        figureLabel: `${fmt(n)} DEKs`,
        baseline: med('empty', 'rssBytes') / 2 ** 20,
        baselineLabel: 'empty',
        unit: 'MiB',
        target: 1.5,
        better: 'lower',
      }),
    ],
    details: {
      deks: n,
      readings,
      processReadyMs: {
        empty: round(med('empty', 'sinceProcessStartMs'), 1),
        seeded: round(med('seeded', 'sinceProcessStartMs'), 1),
      },
    },
    notes: [
      `${fmt(n)} DEKs${ctx.mode === 'full' ? '' : ' (1,000,000 with --full)'}; each start is a fresh child process ` +
        'timing createKms() + health(); "bounded RSS" is read as within 1.5× of the empty start',
    ],
  };
}
