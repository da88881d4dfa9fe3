/**
 * Case 5: KEK rotation of N stored DEKs (100,000; also 1,000,000 with --full; 20,000 in quick
 * runs), DEKs rewrapped per second, against a raw LMDB pass over the same registry.mdb that
 * reads every 'deks' record and writes it back in transactions of the same batch size, without
 * crypto. Each round rotates once more (KEK version n -> n+1); the KMS runs with its defaults.
 */
import path from 'node:path';
import { open } from 'lmdb';
import {
  alternate,
  type BenchContext,
  type CaseReport,
  fmt,
  type Metric,
  median,
  metric,
  round,
  seededDir,
} from '../lib.js';
import { createKms } from '../product.js';

export const caseNo = 5;
export const name = 'rotation';

/** The KMS default rotationBatchSize: records per worker round and per transaction. */
const BATCH = 2000;

/** Reads every DEK record and writes it back unchanged, BATCH per transaction; returns records/s. */
async function rawPass(dataDir: string): Promise<{ rate: number; records: number }> {
  const root = open({ path: path.join(dataDir, 'registry.mdb'), compression: false, maxDbs: 8 });
  const deks = root.openDB<unknown, string>({ name: 'deks' });
  const t0 = performance.now();
  let cursor: string | undefined;
  let records = 0;
  try {
    for (;;) {
      const batch: { key: string; value: unknown }[] = [];
      for (const entry of deks.getRange({ start: cursor, limit: BATCH + 1 })) {
        if (entry.key === cursor) continue;
        batch.push(entry);
        if (batch.length === BATCH) break;
      }
      if (batch.length === 0) break;
      await root.transaction(() => {
        for (const { key, value } of batch) deks.putSync(key, value);
      });
      records += batch.length;
      cursor = batch[batch.length - 1]!.key;
    }
  } finally {
    await root.close();
  }
  return { rate: records / ((performance.now() - t0) / 1000), records };
}

async function rotation(dataDir: string, masterKeyFile: string, expected: number): Promise<number> {
  const kms = await createKms({ dataDir, masterKeyFile });
  try {
    const t0 = performance.now();
    const status = await kms.rotateKek();
    const seconds = (performance.now() - t0) / 1000;
    if (status.state !== 'completed' || status.total !== expected) {
      throw new Error(
        `rotation ended ${status.state} with ${status.done}/${status.total} (expected ${expected})`,
      );
    }
    return expected / seconds;
  } finally {
    await kms.close();
  }
}

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const sizes = ctx.mode === 'quick' ? [20_000] : ctx.mode === 'full' ? [100_000, 1_000_000] : [100_000];
  const metrics: Metric[] = [];
  const details: Record<string, unknown> = {};
  const notes: string[] = [];
  for (const n of sizes) {
    const seeded = await seededDir(ctx, n);
    const rounds = n >= 1_000_000 ? Math.min(ctx.rounds, 3) : ctx.rounds;
    const samples = await alternate(
      rounds,
      {
        raw: () => rawPass(seeded.dataDir).then((r) => r.rate),
        rotation: () => rotation(seeded.dataDir, seeded.masterKeyFile, n),
      },
      (r, last) =>
        ctx.progress(
          `  ${fmt(n)} DEKs round ${r + 1}/${rounds}: rotation ${fmt(last.rotation)} DEKs/s ` +
            `(${fmt(n / last.rotation, 1)} s), raw LMDB ${fmt(last.raw)} records/s`,
        ),
    );
    const rotationRate = median(samples.rotation);
    const label = n >= 1_000_000 ? `${n / 1_000_000}m` : `${n / 1000}k`;
    metrics.push(
      metric({
        id: `rotation_${label}`,
        caseNo,
        title: `KEK rotation of ${fmt(n)} DEKs vs raw LMDB read+rewrite pass`,
        figure: rotationRate,
        figureLabel: 'DEKs rewrapped/s',
        baseline: median(samples.raw),
        baselineLabel: 'raw LMDB records/s',
        unit: '/s',
        target: 0.3,
        better: 'higher',
      }),
    );
    details[label] = {
      samples,
      rotationSeconds: round(n / rotationRate, 2),
      seedSeconds: round(seeded.seedSeconds, 2),
      seedRate: Math.round(n / seeded.seedSeconds),
    };
    notes.push(
      `${fmt(n)} DEKs seeded in ${fmt(seeded.seedSeconds, 1)} s (${fmt(n / seeded.seedSeconds)}/s, ` +
        `createDekForThread x1024 concurrent, audit off); rotation took ${fmt(n / rotationRate, 1)} s (median)`,
    );
  }
  if (ctx.mode === 'quick') notes.push('quick run: 20,000 DEKs instead of 100,000');
  return { metrics, details, notes };
}
