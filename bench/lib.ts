/**
 * Shared benchmark plumbing. Every figure is a ratio against a baseline measured in the same run,
 * alternating the two and taking medians, because the machines are shared and noisy.
 */
import { createCipheriv, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createKms, generateMasterKeyFile } from '../src/index.js';

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

export function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** Runs `op` from `callers` concurrent loops for `ms`; returns ops/s and per-op latencies (µs). */
export async function closedLoop(
  callers: number,
  ms: number,
  op: () => Promise<unknown>,
  sampleLatency = false,
): Promise<{ opsPerSec: number; latenciesUs: number[] }> {
  let count = 0;
  const latencies: number[] = [];
  const start = performance.now();
  const end = start + ms;
  const loop = async () => {
    while (performance.now() < end) {
      const t0 = sampleLatency ? performance.now() : 0;
      await op();
      if (sampleLatency) latencies.push((performance.now() - t0) * 1000);
      count++;
    }
  };
  await Promise.all(Array.from({ length: callers }, loop));
  return { opsPerSec: count / ((performance.now() - start) / 1000), latenciesUs: latencies };
}

/** Raw node:crypto AES-256-GCM in the main thread: the baseline every KMS figure is held to. */
export function inlineEncrypt(ms: number, payload: Buffer, key = randomBytes(32)): number {
  let count = 0;
  const start = performance.now();
  const end = start + ms;
  while (performance.now() < end) {
    for (let i = 0; i < 64; i++) {
      const cipher = createCipheriv('aes-256-gcm', key, randomBytes(12));
      cipher.update(payload);
      cipher.final();
      cipher.getAuthTag();
    }
    count += 64;
  }
  return count / ((performance.now() - start) / 1000);
}

export async function tempKms(options: { poolSize?: number; audit?: boolean } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'progressdb-bench-'));
  await generateMasterKeyFile(path.join(dir, 'master.key'));
  const kms = await createKms({
    dataDir: path.join(dir, 'kms'),
    masterKeyFile: path.join(dir, 'master.key'),
    ...options,
  });
  return {
    kms,
    dir,
    async dispose() {
      await kms.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export function fmt(n: number, digits = 0): string {
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
