/**
 * Case 6: the embedded encrypt load with the signed audit log on against audit: false, and the
 * audit log's bytes per operation (what a disk must take: at 60k ops/s, 230 B/op is 13 MB/s).
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  alternate,
  type BenchContext,
  type CaseReport,
  closedLoop,
  fmt,
  medians,
  metric,
  payloadOf,
  tempKms,
} from '../lib.js';

export const caseNo = 6;
export const name = 'audit';

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const payload = payloadOf(1024);
  const on = await tempKms({ audit: true });
  const off = await tempKms({ audit: false });
  try {
    const onKey = (await on.kms.createDekForThread('bench-audit')).keyId;
    const offKey = (await off.kms.createDekForThread('bench-audit')).keyId;
    let counted = 0;
    const load = (kms: typeof on.kms, keyId: string, ms: number) =>
      closedLoop(256, ms, () => kms.encrypt(keyId, payload).then(() => kms === on.kms && counted++)).then(
        (r) => r.opsPerSec,
      );
    await load(on.kms, onKey, 200);
    await load(off.kms, offKey, 200);
    const auditFile = path.join(on.dir, 'kms', 'kms-audit.log');
    const bytesBefore = fs.statSync(auditFile).size;
    counted = 0;
    const samples = await alternate(
      ctx.rounds,
      { auditOn: () => load(on.kms, onKey, ctx.ms), auditOff: () => load(off.kms, offKey, ctx.ms) },
      (r, last) =>
        ctx.progress(
          `  round ${r + 1}/${ctx.rounds}: audit on ${fmt(last.auditOn)}/s, off ${fmt(last.auditOff)}/s`,
        ),
    );
    const med = medians(samples);
    // Lines of the ops in flight at a round's end may still be unwritten: a round's worth of
    // 256 lines against hundreds of thousands of ops.
    const bytesPerOp = (fs.statSync(auditFile).size - bytesBefore) / counted;
    return {
      metrics: [
        metric({
          id: 'audit_on_vs_off',
          caseNo,
          title: 'embedded encrypt 1 KiB at 256 callers, audit log on vs off',
          figure: med.auditOn,
          figureLabel: 'audit on',
          baseline: med.auditOff,
          baselineLabel: 'audit off',
          unit: 'ops/s',
          target: 0.8,
          better: 'higher',
        }),
      ],
      details: { samples, auditBytesPerOp: Math.round(bytesPerOp), auditedOps: counted },
      notes: [
        `audit log volume: ${fmt(bytesPerOp)} bytes per encrypt (${fmt(counted)} ops); at the audit-on rate ` +
          `of ${fmt(med.auditOn)} ops/s that is ${fmt((bytesPerOp * med.auditOn) / 1e6, 1)} MB/s`,
      ],
    };
  } finally {
    await on.dispose();
    await off.dispose();
  }
}
