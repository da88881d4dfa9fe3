/**
 * Key creation for new threads (issue 12: ≥ 20,000/s embedded with audit on): createDekForThread
 * for threads never seen before, 256 concurrent callers, against the user's alternative done in
 * the main thread in the same run: a random 32-byte key wrapped with node:crypto AES-256-GCM and
 * stored with its thread index in an LMDB file of its own, each caller awaiting the durable write
 * (lmdb-js batches concurrent writes into one commit, as the registry does). Rounds alternate; each
 * side reports creates per second and CPU time per create summed over every thread of the process.
 *
 * Run: npm run build && npm run bench:creates -- [--creates 20000] [--rounds 3] [--callers 256]
 */
import { createCipheriv, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { open } from 'lmdb';
import { fmt, median, tempKms } from './lib.js';

const { values } = parseArgs({
  options: {
    creates: { type: 'string', default: '20000' },
    rounds: { type: 'string', default: '3' },
    callers: { type: 'string', default: '256' },
  },
});
const creates = Number(values.creates);
const rounds = Number(values.rounds);
const callers = Number(values.callers);

/** Runs `create(i)` for `count` new threads over the callers: creates/s and CPU µs per create. */
async function measure(count: number, create: (i: number) => Promise<unknown>) {
  let next = 0;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: callers }, async () => {
      for (let i = next++; i < count; i = next++) await create(i);
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  return { rate: count / seconds, cpuUs: (cpu.user + cpu.system) / count };
}

const embedded = await tempKms({ auditDataOps: 'aggregate' });
const inlineDir = fs.mkdtempSync(path.join(os.tmpdir(), 'progressdb-bench-inline-'));
const inlineDb = open({ path: path.join(inlineDir, 'keys.mdb'), compression: false });
const inlineKek = randomBytes(32);

let run = 0;
const sides = {
  embedded: (count: number) => {
    const prefix = `embedded-${run++}`;
    return measure(count, (i) => embedded.kms.createDekForThread(`${prefix}-${i}`));
  },
  inline: (count: number) => {
    const prefix = `inline-${run++}`;
    return measure(count, async (i) => {
      const key = randomBytes(32);
      const iv = randomBytes(12);
      const cipher = createCipheriv('aes-256-gcm', inlineKek, iv);
      const wrapped = Buffer.concat([iv, cipher.update(key), cipher.final(), cipher.getAuthTag()]);
      key.fill(0);
      const keyId = `dek_${randomBytes(16).toString('hex')}`;
      const threadId = `${prefix}-${i}`;
      await inlineDb.transaction(() => {
        inlineDb.putSync(`dek/${keyId}`, { keyId, threadId, wrapped, createdAt: new Date().toISOString() });
        inlineDb.putSync(`thread/${threadId}`, keyId);
      });
    });
  },
};

// Warm-up: JIT, the workers' key caches, LMDB pages.
await sides.embedded(Math.min(5000, creates));
await sides.inline(Math.min(5000, creates));

const samples: Record<string, { rate: number[]; cpuUs: number[] }> = {
  embedded: { rate: [], cpuUs: [] },
  inline: { rate: [], cpuUs: [] },
};
for (let r = 0; r < rounds; r++) {
  for (const name of ['inline', 'embedded'] as const) {
    const { rate, cpuUs } = await sides[name](creates);
    samples[name]?.rate.push(rate);
    samples[name]?.cpuUs.push(cpuUs);
  }
  process.stderr.write(`round ${r + 1}/${rounds} done\n`);
}
await embedded.dispose();
await inlineDb.close();
fs.rmSync(inlineDir, { recursive: true, force: true });

const rateOf = (name: string) => median(samples[name]?.rate ?? []);
const cpuOf = (name: string) => median(samples[name]?.cpuUs ?? []);
const lines = [
  `## Key creation for new threads, ${callers} callers, ${fmt(creates)} creates per round`,
  '',
  `Median of ${rounds} alternating rounds; CPU time of every thread of the process per create.`,
  '',
  '| side | creates/s | vs inline | CPU µs/create |',
  '|---|---|---|---|',
  `| inline: node:crypto wrap + own LMDB file, main thread | ${fmt(rateOf('inline'))} | 1.00× | ${fmt(cpuOf('inline'), 1)} |`,
  `| embedded createDekForThread (audit on) | ${fmt(rateOf('embedded'))} | ${(rateOf('embedded') / rateOf('inline')).toFixed(2)}× | ${fmt(cpuOf('embedded'), 1)} |`,
];
process.stdout.write(`${lines.join('\n')}\n`);
