/**
 * Case 1: embedded KMS encrypt and decrypt through the public API at 1, 16 and 256 concurrent
 * callers, against raw node:crypto AES-256-GCM inline in the main thread; single-caller latency
 * against a bare Piscina round trip echoing the same payload. 1 KiB is the headline; other sizes at 256 callers.
 */
import { Piscina } from 'piscina';
import {
  alternate,
  type BenchContext,
  type CaseReport,
  closedLoop,
  fmt,
  inlineDecrypt,
  inlineEncrypt,
  type Metric,
  median,
  metric,
  payloadOf,
  percentile,
  round,
  tempKms,
} from '../lib.js';

export const caseNo = 1;
export const name = 'embedded';

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const callerCounts = ctx.mode === 'quick' ? [1, 256] : [1, 16, 256];
  const { kms, dispose } = await tempKms();
  const health = await kms.health();
  const echoPool = new Piscina({
    filename: new URL('../echo-worker.ts', import.meta.url).href,
    minThreads: health.poolThreads,
    maxThreads: health.poolThreads,
    idleTimeout: Number.POSITIVE_INFINITY,
  });
  const metrics: Metric[] = [];
  const details: Record<string, unknown> = { poolThreads: health.poolThreads };
  try {
    const { keyId } = await kms.createDekForThread('bench-embedded');
    await closedLoop(1, 100, () => echoPool.run(payloadOf(1024)));
    for (const [sizeIndex, size] of ctx.sizes.entries()) {
      const headline = sizeIndex === 0;
      const payload = payloadOf(size);
      const { ciphertext } = await kms.encrypt(keyId, payload);
      // Warm-up: JIT, worker start, key caches.
      inlineEncrypt(100, payload);
      await closedLoop(256, 200, () => kms.encrypt(keyId, payload));
      await closedLoop(256, 200, () => kms.decrypt(keyId, ciphertext));
      const counts = headline ? callerCounts : [256];
      const p50: Record<string, number[]> = {};
      const p99: Record<string, number[]> = {};
      const latency = (key: string, r: { latenciesUs: number[] }) => {
        (p50[key] ??= []).push(percentile(r.latenciesUs, 50));
        (p99[key] ??= []).push(percentile(r.latenciesUs, 99));
      };
      const steps: Record<string, () => Promise<number> | number> = {
        inlineEncrypt: () => inlineEncrypt(ctx.ms, payload),
        inlineDecrypt: () => inlineDecrypt(ctx.ms, payload),
      };
      for (const callers of counts) {
        const window = callers === 1 ? ctx.ms / 2 : ctx.ms;
        steps[`encrypt@${callers}`] = async () => {
          const r = await closedLoop(callers, window, () => kms.encrypt(keyId, payload), true);
          latency(`encrypt@${callers}`, r);
          return r.opsPerSec;
        };
        steps[`decrypt@${callers}`] = async () => {
          const r = await closedLoop(callers, window, () => kms.decrypt(keyId, ciphertext), true);
          latency(`decrypt@${callers}`, r);
          return r.opsPerSec;
        };
      }
      if (headline) {
        // The baseline moves the same payload to a worker and back: the cost of the thread hop alone.
        steps.echo = async () => {
          const r = await closedLoop(1, ctx.ms / 2, () => echoPool.run(payload), true);
          latency('echo', r);
          return r.opsPerSec;
        };
      }
      const samples = await alternate(ctx.rounds, steps, (r, last) =>
        ctx.progress(
          `  ${size} B round ${r + 1}/${ctx.rounds}: inline enc ${fmt(last.inlineEncrypt!)}/s, ` +
            `embedded enc@256 ${fmt(last['encrypt@256']!)}/s, dec@256 ${fmt(last['decrypt@256']!)}/s`,
        ),
      );
      const med = Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, median(v)]));
      const lat = Object.fromEntries(
        Object.keys(p50).map((k) => [
          k,
          { p50Us: round(median(p50[k]!), 1), p99Us: round(median(p99[k]!), 1) },
        ]),
      );
      details[`${size}B`] = {
        opsPerSec: Object.fromEntries(Object.entries(med).map(([k, v]) => [k, Math.round(v)])),
        latency: lat,
      };
      const label = size === 1024 ? '' : `_${size}B`;
      for (const op of ['encrypt', 'decrypt'] as const) {
        const base = op === 'encrypt' ? med.inlineEncrypt! : med.inlineDecrypt!;
        metrics.push(
          metric({
            id: `embedded_${op}_256${label}`,
            caseNo,
            title: `embedded ${op} ${size} B, 256 callers vs inline node:crypto`,
            figure: med[`${op}@256`]!,
            figureLabel: `${op}@256`,
            baseline: base,
            baselineLabel: `inline ${op}`,
            unit: 'ops/s',
            target: 1.2,
            better: 'higher',
          }),
        );
      }
      if (headline) {
        metrics.push(
          metric({
            id: 'embedded_latency_1',
            caseNo,
            title: `embedded encrypt ${size} B p50 at 1 caller vs bare Piscina echo p50`,
            figure: median(p50['encrypt@1']!),
            figureLabel: 'encrypt@1 p50',
            baseline: median(p50.echo!),
            baselineLabel: 'Piscina echo of the payload, p50',
            unit: 'µs',
            target: 1.5,
            better: 'lower',
          }),
        );
      }
    }
  } finally {
    await echoPool.destroy();
    await dispose();
  }
  const notes = [`payload sizes ${ctx.sizes.join(', ')} B; callers ${callerCounts.join(', ')} (1 KiB)`];
  return { metrics, details, notes };
}
