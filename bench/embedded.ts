/**
 * Embedded KMS encrypt through the public API against raw node:crypto in the main thread, and
 * single-caller latency against a bare Piscina echo round trip. Run: npm run bench:embedded
 * (options: --rounds N, --ms N, --payload BYTES).
 */
import { randomFillSync } from 'node:crypto';
import { parseArgs } from 'node:util';
import { Piscina } from 'piscina';
import { closedLoop, fmt, inlineEncrypt, median, percentile, tempKms } from './lib.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '5' },
    ms: { type: 'string', default: '1000' },
    payload: { type: 'string', default: '1024' },
    callers: { type: 'string', default: '256' },
  },
});
const rounds = Number(values.rounds);
const ms = Number(values.ms);
// Its own ArrayBuffer (not a slice of Node's 8 KiB pool), so neither side clones more than it sends.
const payload = Buffer.from(randomFillSync(new Uint8Array(Number(values.payload))).buffer);
const callers = Number(values.callers);

const { kms, dispose } = await tempKms();
const { keyId } = await kms.createDekForThread('bench-thread');
const health = await kms.health();
const echoPool = new Piscina({
  filename: new URL('./echo-worker.ts', import.meta.url).href,
  minThreads: health.poolThreads,
  maxThreads: health.poolThreads,
  idleTimeout: Number.POSITIVE_INFINITY,
});

// Warm up both sides (JIT, worker start, key caches).
inlineEncrypt(300, payload);
await closedLoop(callers, 300, () => kms.encrypt(keyId, payload));
await closedLoop(1, 200, () => echoPool.run(payload));

const inline: number[] = [];
const embedded: number[] = [];
const echoP50: number[] = [];
const kmsP50: number[] = [];
const kmsP99: number[] = [];
for (let round = 0; round < rounds; round++) {
  inline.push(inlineEncrypt(ms, payload));
  embedded.push((await closedLoop(callers, ms, () => kms.encrypt(keyId, payload))).opsPerSec);
  // The baseline moves the same payload to a worker and back: the cost of the thread hop alone.
  const echo = await closedLoop(1, ms / 2, () => echoPool.run(payload), true);
  const single = await closedLoop(1, ms / 2, () => kms.encrypt(keyId, payload), true);
  echoP50.push(percentile(echo.latenciesUs, 50));
  kmsP50.push(percentile(single.latenciesUs, 50));
  kmsP99.push(percentile(single.latenciesUs, 99));
  process.stderr.write(
    `round ${round + 1}/${rounds}: inline ${fmt(inline.at(-1)!)} ops/s, embedded@${callers} ${fmt(embedded.at(-1)!)} ops/s, ` +
      `echo p50 ${fmt(echoP50.at(-1)!, 1)} µs, encrypt@1 p50 ${fmt(kmsP50.at(-1)!, 1)} µs\n`,
  );
}
await echoPool.destroy();
await dispose();

const throughputRatio = median(embedded) / median(inline);
const latencyRatio = median(kmsP50) / median(echoP50);
const result = {
  payloadBytes: payload.length,
  poolThreads: health.poolThreads,
  inlineOpsPerSec: Math.round(median(inline)),
  embeddedOpsPerSec: Math.round(median(embedded)),
  callers,
  throughputRatio: Number(throughputRatio.toFixed(3)),
  throughputTarget: 1.0,
  echoP50Us: Number(median(echoP50).toFixed(1)),
  encryptP50Us: Number(median(kmsP50).toFixed(1)),
  encryptP99Us: Number(median(kmsP99).toFixed(1)),
  latencyRatio: Number(latencyRatio.toFixed(3)),
  latencyTarget: 1.5,
};
console.log(
  `embedded encrypt @${callers} callers: ${fmt(result.embeddedOpsPerSec)} ops/s vs inline node:crypto ${fmt(result.inlineOpsPerSec)} ops/s = ${result.throughputRatio}x (target >= 1.0x)`,
);
console.log(
  `single caller p50: ${result.encryptP50Us} µs vs bare Piscina echo of the same payload ${result.echoP50Us} µs = ${result.latencyRatio}x (target <= 1.5x)`,
);
console.log(JSON.stringify(result));
