/**
 * Realistic traffic: one DEK per thread, thousands of threads, the key of each op drawn
 * Zipf(s) over them (a few busy threads, a long tail). Embedded encrypt and decrypt at 256
 * callers through the public API, against the user's alternatives doing the same work with the
 * same key sequence in the main thread: node:crypto AES-256-GCM (the baseline every ratio is
 * held to) and sodium-native XChaCha20-Poly1305 (what isolation in workers costs). Rounds
 * alternate so that a noisy machine hits every side alike.
 *
 * Each embedded row also splits its CPU per op by thread (Linux: /proc/self/task): the main thread,
 * the threads its KMS started (the crypto workers), and the rest (V8's GC helpers, libuv), and
 * gives the cores busy over the loop, so a figure that misses shows what limits it: a thread at
 * a full core, or every thread waiting on hand-offs. `--audit-data-ops off` adds a side with the
 * audit log off, to show what auditing every use of every key costs.
 *
 * Run: npm run bench:keys -- [--keys 10000] [--zipf 1.1] [--rounds 3] [--ms 1000] [--callers 256]
 *        [--audit-data-ops aggregate,each,off]
 */
import { createCipheriv, createDecipheriv, randomBytes, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import sodium from 'sodium-native';
import type { AuditDataOps } from '../src/worker-abi/index.js';
import { closedLoop, fmt, median, tempKms } from './lib.js';

const { values } = parseArgs({
  options: {
    keys: { type: 'string', default: '10000' },
    zipf: { type: 'string', default: '1.1' },
    rounds: { type: 'string', default: '3' },
    ms: { type: 'string', default: '1000' },
    payload: { type: 'string', default: '1024' },
    callers: { type: 'string', default: '256' },
    'dek-cache-size': { type: 'string' },
    /** The audit modes to run the embedded side in, each its own KMS: `aggregate,each` by default. */
    'audit-data-ops': { type: 'string' },
    /** `embedded`: only the embedded rows, for profiling the KMS side alone (no ratios). */
    only: { type: 'string' },
  },
});
const keyCount = Number(values.keys);
const rounds = Number(values.rounds);
const ms = Number(values.ms);
const callers = Number(values.callers);
const payload = Buffer.from(randomFillSync(new Uint8Array(Number(values.payload))).buffer);

/** A sequence of key indexes drawn Zipf(s) over `n` keys, ranks shuffled over the indexes. */
function zipfSequence(n: number, s: number, length: number): Uint32Array {
  const cdf = new Float64Array(n);
  let total = 0;
  for (let r = 0; r < n; r++) {
    total += 1 / (r + 1) ** s;
    cdf[r] = total;
  }
  const rankToKey = Uint32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [rankToKey[i], rankToKey[j]] = [rankToKey[j] as number, rankToKey[i] as number];
  }
  const seq = new Uint32Array(length);
  for (let i = 0; i < length; i++) {
    const u = Math.random() * total;
    let lo = 0;
    let hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((cdf[mid] as number) < u) lo = mid + 1;
      else hi = mid;
    }
    seq[i] = rankToKey[lo] as number;
  }
  return seq;
}

const SEQ_LENGTH = 1 << 18;
const seq = zipfSequence(keyCount, Number(values.zipf), SEQ_LENGTH);
const distinct = new Set(seq).size;
let cursor = 0;
const nextKey = (): number => seq[cursor++ & (SEQ_LENGTH - 1)] as number;

// The user's alternative keeps raw keys in its heap; the same number of them, the same sequence.
const rawKeys = Array.from({ length: keyCount }, () => randomBytes(32));
const inlineCiphertexts = rawKeys.map((key) => {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  const body = Buffer.concat([cipher.update(payload), cipher.final()]);
  return { iv, body, tag: cipher.getAuthTag() };
});
const sodiumOut = Buffer.alloc(payload.length + 16);
const sodiumNonce = Buffer.alloc(24);
const sodiumCiphertexts = rawKeys.map((key) => {
  const nonce = randomBytes(sodiumNonce.length);
  const out = Buffer.alloc(sodiumOut.length);
  sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(out, payload, null, null, nonce, key);
  return { nonce, out };
});
const sodiumPlain = Buffer.alloc(payload.length);

/** Runs `op` in a synchronous loop for `ms`: ops per second. */
function inlineLoop(op: () => void): number {
  let count = 0;
  const start = performance.now();
  const end = start + ms;
  while (performance.now() < end) {
    for (let i = 0; i < 64; i++) op();
    count += 64;
  }
  return count / ((performance.now() - start) / 1000);
}

const inline = {
  nodeEncrypt: () =>
    inlineLoop(() => {
      const cipher = createCipheriv('aes-256-gcm', rawKeys[nextKey()] as Buffer, randomBytes(12));
      cipher.update(payload);
      cipher.final();
      cipher.getAuthTag();
    }),
  nodeDecrypt: () =>
    inlineLoop(() => {
      const i = nextKey();
      const c = inlineCiphertexts[i] as (typeof inlineCiphertexts)[number];
      const decipher = createDecipheriv('aes-256-gcm', rawKeys[i] as Buffer, c.iv);
      decipher.setAuthTag(c.tag);
      decipher.update(c.body);
      decipher.final();
    }),
  sodiumEncrypt: () =>
    inlineLoop(() => {
      sodium.randombytes_buf(sodiumNonce);
      const key = rawKeys[nextKey()] as Buffer;
      sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(sodiumOut, payload, null, null, sodiumNonce, key);
    }),
  sodiumDecrypt: () =>
    inlineLoop(() => {
      const i = nextKey();
      const c = sodiumCiphertexts[i] as (typeof sodiumCiphertexts)[number];
      const key = rawKeys[i] as Buffer;
      sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(sodiumPlain, null, c.out, null, c.nonce, key);
    }),
};

const cacheSize = values['dek-cache-size'];
/** An audit_data_ops mode, or `off`: the audit log off altogether. */
type SideMode = AuditDataOps | 'off';
const auditModes = (values['audit-data-ops'] ?? 'aggregate,each').split(',') as SideMode[];

/** CPU time (µs) of each thread of this process by thread id; empty where /proc is not there. */
function threadCpu(): Map<string, number> {
  const cpu = new Map<string, number>();
  let tids: string[];
  try {
    tids = fs.readdirSync('/proc/self/task');
  } catch {
    return cpu;
  }
  // utime and stime are in clock ticks: USER_HZ, 100 per second on Linux.
  for (const tid of tids) {
    try {
      const stat = fs.readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      cpu.set(tid, (Number(fields[11]) + Number(fields[12])) * 10_000);
    } catch {
      // The thread ended between the listing and the read.
    }
  }
  return cpu;
}

/** One embedded loop's CPU per op split by thread, and the cores its threads kept busy. */
interface ThreadSplit {
  main: number;
  kms: number;
  other: number;
  cores: number;
}

/**
 * One embedded KMS writing its audit log in `mode`, with `keyCount` thread keys and a ciphertext
 * under each; its loops count ops, so the log's growth over them gives bytes per operation.
 */
async function embeddedSide(mode: SideMode) {
  const before = threadCpu();
  const side = await tempKms({
    ...(mode === 'off' ? { audit: false } : { auditDataOps: mode }),
    ...(cacheSize !== undefined && { dekCacheSize: Number(cacheSize) }),
  });
  // The threads this KMS started: its crypto workers.
  const kmsThreads = new Set([...threadCpu().keys()].filter((tid) => !before.has(tid)));
  const { kms } = side;
  process.stderr.write(`creating ${fmt(keyCount)} thread keys (audit ${mode})…\n`);
  const created = performance.now();
  const keyIds: string[] = new Array(keyCount);
  let made = 0;
  await Promise.all(
    Array.from({ length: 256 }, async () => {
      for (let i = made++; i < keyCount; i = made++) {
        keyIds[i] = (await kms.createDekForThread(`bench-thread-${i}`)).keyId;
      }
    }),
  );
  const createRate = keyCount / ((performance.now() - created) / 1000);
  const ciphertexts: Buffer[] = new Array(keyCount);
  for (let i = 0; i < keyCount; i += 1000) {
    const items = keyIds.slice(i, i + 1000).map((keyId) => ({ keyId, plaintext: payload }));
    const results = await kms.encryptBatch(items);
    for (const [j, r] of results.entries()) {
      if (!r.ok) throw r.error;
      ciphertexts[i + j] = r.value.ciphertext;
    }
  }
  const dataDir = path.join(side.dir, 'kms');
  // The live file and the ones it rolled over to (128 MiB each by default).
  const auditBytes = () =>
    fs
      .readdirSync(dataDir)
      .filter((name) => name.startsWith('kms-audit.log'))
      .reduce((sum, name) => sum + fs.statSync(path.join(dataDir, name)).size, 0);
  const audit = { ops: 0, bytes: 0 };
  /** A closed loop whose ops and audit log growth are added to `audit`. */
  const mainThread = String(process.pid);
  const measured = async (op: () => Promise<unknown>, splits: ThreadSplit[]) => {
    const before = mode === 'off' ? 0 : auditBytes();
    const cpu0 = threadCpu();
    const t0 = performance.now();
    const r = await closedLoop(callers, ms, op);
    const wallUs = (performance.now() - t0) * 1000;
    const cpu1 = threadCpu();
    const split: ThreadSplit = { main: 0, kms: 0, other: 0, cores: 0 };
    for (const [tid, us] of cpu1) {
      const spent = us - (cpu0.get(tid) ?? 0);
      split.cores += spent / wallUs;
      if (tid === mainThread) split.main += spent / r.ops;
      else if (kmsThreads.has(tid)) split.kms += spent / r.ops;
      else split.other += spent / r.ops;
    }
    if (cpu1.size > 0) splits.push(split);
    audit.ops += r.ops;
    audit.bytes += (mode === 'off' ? 0 : auditBytes()) - before;
    return r.opsPerSec;
  };
  const splits = { encrypt: [] as ThreadSplit[], decrypt: [] as ThreadSplit[] };
  return {
    mode,
    createRate,
    audit,
    dispose: side.dispose,
    splits,
    encrypt: () => measured(() => kms.encrypt(keyIds[nextKey()] as string, payload), splits.encrypt),
    decrypt: () =>
      measured(() => {
        const i = nextKey();
        return kms.decrypt(keyIds[i] as string, ciphertexts[i] as Buffer);
      }, splits.decrypt),
  };
}

// libuv starts its thread pool on first use: start it now, so that the only threads a KMS side
// starts are its own (its crypto workers).
await fs.promises.stat('.');
const sides = [];
for (const mode of auditModes) sides.push(await embeddedSide(mode));
const embeddedName = (op: string, mode: SideMode) => `embedded ${op} (audit ${mode})`;

// Warm-up: JIT on both sides, workers' key caches, LMDB pages.
for (const side of sides) {
  await side.encrypt();
  await side.decrypt();
  side.audit.ops = 0;
  side.audit.bytes = 0;
  side.splits.encrypt.length = 0;
  side.splits.decrypt.length = 0;
}
inline.nodeEncrypt();

const samples: Record<string, number[]> = {};
const cpuSamples: Record<string, number[]> = {};
/**
 * Runs one side's loop and records its ops/s and its CPU time per op summed over every thread of
 * this process (getrusage: the workers and lmdb's and libuv's threads too). CPU per op moves far
 * less than ops/s when other work shares the machine, so it is the figure to A/B a change by.
 */
const record = async (name: string, loop: () => number | Promise<number>): Promise<number> => {
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const opsPerSec = await loop();
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  samples[name] ??= [];
  samples[name].push(opsPerSec);
  cpuSamples[name] ??= [];
  cpuSamples[name].push((cpu.user + cpu.system) / (opsPerSec * seconds));
  return opsPerSec;
};
const cpuOf = (name: string) => median(cpuSamples[name] as number[]);
for (let r = 0; r < rounds; r++) {
  if (values.only === 'embedded') {
    for (const side of sides) {
      const encrypt = await record(embeddedName('encrypt', side.mode), side.encrypt);
      const decrypt = await record(embeddedName('decrypt', side.mode), side.decrypt);
      process.stderr.write(
        `audit ${side.mode}: encrypt ${fmt(encrypt)}/s (${fmt(cpuOf(embeddedName('encrypt', side.mode)), 1)} µs CPU/op), ` +
          `decrypt ${fmt(decrypt)}/s (${fmt(cpuOf(embeddedName('decrypt', side.mode)), 1)} µs CPU/op; medians so far)\n`,
      );
    }
    continue;
  }
  await record('inline node:crypto encrypt', inline.nodeEncrypt);
  for (const side of sides) await record(embeddedName('encrypt', side.mode), side.encrypt);
  await record('inline sodium encrypt', inline.sodiumEncrypt);
  await record('inline node:crypto decrypt', inline.nodeDecrypt);
  for (const side of sides) await record(embeddedName('decrypt', side.mode), side.decrypt);
  await record('inline sodium decrypt', inline.sodiumDecrypt);
  process.stderr.write(`round ${r + 1}/${rounds} done\n`);
}
for (const side of sides) await side.dispose();
if (values.only === 'embedded') process.exit(0);

const med = (name: string) => median(samples[name] as number[]);
const row = (name: string, base: string) =>
  `| ${name} | ${fmt(med(name))} | ${(med(name) / med(base)).toFixed(2)}× | ${fmt(cpuOf(name), 1)} |`;
const header = [
  `## ${fmt(keyCount)} thread keys, Zipf(${values.zipf}), ${callers} callers, ${payload.length} B`,
  '',
  `${fmt(distinct)} distinct keys in the ${fmt(SEQ_LENGTH)}-op sequence; median of ${rounds} alternating rounds of ${ms} ms; ` +
    `key creation (256 callers) ${sides.map((side) => `${fmt(side.createRate)}/s (audit ${side.mode})`).join(', ')}.`,
  '',
  ...sides
    .filter((side) => side.mode !== 'off')
    .map(
      (side) =>
        `Audit log with audit_data_ops ${side.mode}: ${fmt(side.audit.bytes / side.audit.ops, 1)} bytes per ` +
        `operation over the measured rounds (${fmt(side.audit.ops)} ops).`,
    ),
  '',
  'CPU/op: CPU time of every thread of the process over the ops it did (median); the inline sides use one.',
  '',
  '| side | ops/s | vs inline node:crypto | CPU µs/op |',
  '|---|---|---|---|',
];
const lines = [
  ...header,
  row('inline node:crypto encrypt', 'inline node:crypto encrypt'),
  ...sides.map((side) => row(embeddedName('encrypt', side.mode), 'inline node:crypto encrypt')),
  row('inline sodium encrypt', 'inline node:crypto encrypt'),
  row('inline node:crypto decrypt', 'inline node:crypto decrypt'),
  ...sides.map((side) => row(embeddedName('decrypt', side.mode), 'inline node:crypto decrypt')),
  row('inline sodium decrypt', 'inline node:crypto decrypt'),
];
/** The embedded rows' CPU per op by thread (medians over the rounds), when /proc gave it. */
const splitRows = sides.flatMap((side) =>
  (['encrypt', 'decrypt'] as const).flatMap((op) => {
    const list = side.splits[op];
    if (list.length === 0) return [];
    const m = (pick: (s: ThreadSplit) => number) => median(list.map(pick));
    return [
      `| ${embeddedName(op, side.mode)} | ${fmt(
        m((s) => s.main),
        2,
      )} | ${fmt(
        m((s) => s.kms),
        2,
      )} | ` +
        `${fmt(
          m((s) => s.other),
          2,
        )} | ${fmt(
          m((s) => s.cores),
          2,
        )} |`,
    ];
  }),
);
if (splitRows.length > 0) {
  lines.push(
    '',
    'CPU µs/op by thread: the main thread, the threads the KMS started (its crypto workers, summed), ' +
      "the rest (V8's GC helpers, libuv); cores: CPU time of every thread over the loop's wall time.",
    '',
    '| side | main | KMS threads | other | cores busy |',
    '|---|---|---|---|---|',
    ...splitRows,
  );
}
process.stdout.write(`${lines.join('\n')}\n`);
