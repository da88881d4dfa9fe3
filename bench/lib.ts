/**
 * Shared benchmark plumbing. Every figure is a ratio against a baseline measured in the same run,
 * alternating the two and taking medians, because the machines are shared and noisy.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createCipheriv, createDecipheriv, randomBytes, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import autocannon, { type AutocannonRequest } from 'autocannon';
import type { AuditDataOps } from '../src/worker-abi/index.js';
import { cleanEnv, freePort, until } from './processes.js';
import { createKms, generateMasterKeyFile } from './product.js';

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
): Promise<{ opsPerSec: number; ops: number; latenciesUs: number[] }> {
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
  return { opsPerSec: count / ((performance.now() - start) / 1000), ops: count, latenciesUs: latencies };
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

export async function tempKms(
  options: { poolSize?: number; audit?: boolean; dekCacheSize?: number; auditDataOps?: AuditDataOps } = {},
) {
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

// ---------------------------------------------------------------------------------------------
// Issue-5 harness: results, alternation, child processes, load generation.
// ---------------------------------------------------------------------------------------------

export type Better = 'higher' | 'lower';

/** One figure held to its baseline: `ratio` = figure / baseline, compared with `target`. */
export interface Metric {
  id: string;
  caseNo: number;
  title: string;
  figure: number;
  figureLabel: string;
  baseline: number;
  baselineLabel: string;
  unit: string;
  ratio: number;
  target: number;
  better: Better;
  met: boolean;
}

export interface CaseReport {
  metrics: Metric[];
  /** Raw medians and anything else worth keeping in latest.json. */
  details: Record<string, unknown>;
  /** Honest remarks for the table: sizes used, what was skipped and why. */
  notes: string[];
}

export type Mode = 'quick' | 'normal' | 'full';

export interface BenchContext {
  mode: Mode;
  /** Alternating rounds per comparison; medians are taken over them. */
  rounds: number;
  /** Length of one timed throughput window in ms. */
  ms: number;
  /** Payload sizes for the embedded case (the first is the headline 1 KiB). */
  sizes: number[];
  /** Writes one progress line to stderr. */
  progress(message: string): void;
  /** A fresh directory under the run's temporary root (removed at the end). */
  tmp(prefix: string): string;
  /** Per-run cache of expensive fixtures (seeded data dirs) shared between cases. */
  fixtures: Map<string, unknown>;
}

export function metric(m: Omit<Metric, 'ratio' | 'met'>): Metric {
  const ratio = m.baseline > 0 ? m.figure / m.baseline : Number.NaN;
  const met = Number.isFinite(ratio) && (m.better === 'higher' ? ratio >= m.target : ratio <= m.target);
  return { ...m, ratio: round(ratio, 3), figure: round(m.figure, 2), baseline: round(m.baseline, 2), met };
}

export function round(n: number, digits: number): number {
  if (!Number.isFinite(n)) return n;
  const f = 10 ** digits;
  return Math.round(n * f) / f;
}

/**
 * Runs every step once per round, alternating the order (A B, B A, ...) so that drift on a shared
 * machine hits both sides alike; returns each step's samples.
 */
export async function alternate<K extends string>(
  rounds: number,
  steps: Record<K, () => Promise<number> | number>,
  onRound?: (round: number, last: Record<K, number>) => void,
): Promise<Record<K, number[]>> {
  const names = Object.keys(steps) as K[];
  const samples = Object.fromEntries(names.map((n) => [n, [] as number[]])) as Record<K, number[]>;
  for (let r = 0; r < rounds; r++) {
    const order = r % 2 === 0 ? names : [...names].reverse();
    const last = {} as Record<K, number>;
    for (const name of order) {
      const value = await steps[name]();
      samples[name].push(value);
      last[name] = value;
    }
    onRound?.(r, last);
  }
  return samples;
}

export function medians<K extends string>(samples: Record<K, number[]>): Record<K, number> {
  return Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, median(v as number[])])) as Record<
    K,
    number
  >;
}

/** Raw node:crypto AES-256-GCM decrypt in the main thread (the decrypt baseline). */
export function inlineDecrypt(ms: number, payload: Buffer, key = randomBytes(32)): number {
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, iv);
  const ciphertext = Buffer.concat([cipher.update(payload), cipher.final()]);
  const tag = cipher.getAuthTag();
  let count = 0;
  const start = performance.now();
  const end = start + ms;
  while (performance.now() < end) {
    for (let i = 0; i < 64; i++) {
      const decipher = createDecipheriv('aes-256-gcm', key, iv);
      decipher.setAuthTag(tag);
      decipher.update(ciphertext);
      decipher.final();
    }
    count += 64;
  }
  return count / ((performance.now() - start) / 1000);
}

// --- paths ------------------------------------------------------------------------------------

const HERE = path.dirname(fileURLToPath(import.meta.url));

function findRoot(): string {
  let dir = HERE;
  for (;;) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`no package.json above ${HERE}`);
    dir = up;
  }
}

export const REPO_ROOT = findRoot();
export const KMS_CLI = path.join(REPO_ROOT, 'dist/src/cli/progressdb-kms.js');
export const SERVER_CLI = path.join(REPO_ROOT, 'dist/src/cli/progressdb.js');

/** A helper script of the harness (bench/children/NAME.ts). */
export function childScript(name: string): string {
  return path.join(HERE, 'children', `${name}.ts`);
}

/** Throws a clear "not there yet" error when a built piece another issue delivers is missing. */
export function requireFile(file: string, what: string): void {
  if (!fs.existsSync(file)) {
    throw new Error(
      `${what} is not available (${path.relative(REPO_ROOT, file)} missing); run npm run build`,
    );
  }
}

// --- child processes --------------------------------------------------------------------------

const children = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

export class Child {
  stdout = '';
  stderr = '';
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  #gone = false;

  constructor(
    readonly name: string,
    readonly proc: ChildProcess,
  ) {
    children.add(proc);
    proc.stdout?.on('data', (d: Buffer) => {
      this.stdout += d;
      if (this.stdout.length > 1_000_000) this.stdout = this.stdout.slice(-500_000);
    });
    proc.stderr?.on('data', (d: Buffer) => {
      this.stderr += d;
      if (this.stderr.length > 1_000_000) this.stderr = this.stderr.slice(-500_000);
    });
    this.exited = new Promise((resolve) =>
      proc.on('exit', (code, signal) => {
        this.#gone = true;
        children.delete(proc);
        resolve({ code, signal });
      }),
    );
  }

  get gone(): boolean {
    return this.#gone;
  }

  /** Fails with the child's stderr if it has exited. */
  checkAlive(): void {
    if (this.#gone) throw new Error(`${this.name} exited:\n${this.stderr.slice(-2000)}`);
  }

  /** Waits until a stdout line parses as JSON and `pick` returns something for it. */
  async jsonLine<T>(pick: (line: Record<string, unknown>) => T | undefined, ms = 30_000): Promise<T> {
    return until(
      `${this.name} to report ready`,
      async () => {
        for (const line of this.stdout.split('\n')) {
          if (!line.startsWith('{')) continue;
          try {
            const found = pick(JSON.parse(line) as Record<string, unknown>);
            if (found !== undefined) return found;
          } catch {
            // not JSON
          }
        }
        this.checkAlive();
        return undefined;
      },
      ms,
    );
  }

  /** kill -9: no chance to clean up (a crash, a lost machine); resolves once it has exited. */
  async kill9(): Promise<void> {
    if (this.#gone) return;
    this.proc.kill('SIGKILL');
    await this.exited;
  }

  /** SIGTERM, then SIGKILL if it has not exited within `ms`. */
  async stop(ms = 10_000): Promise<void> {
    if (this.#gone) return;
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), ms);
    await this.exited;
    clearTimeout(timer);
  }
}

/**
 * Spawns a Node script. A harness script (.ts) inherits the harness's --import=tsx; the built
 * executables run on plain node, as users run them.
 */
export function spawnNode(
  name: string,
  script: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string; nodeArgs?: string[] } = {},
): Child {
  const nodeArgs = [...(script.endsWith('.ts') ? process.execArgv : []), ...(opts.nodeArgs ?? [])];
  const proc = spawn(process.execPath, [...nodeArgs, script, ...args], {
    env: opts.env ?? cleanEnv(),
    cwd: opts.cwd ?? REPO_ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return new Child(name, proc);
}

async function httpOk(url: string): Promise<true | undefined> {
  try {
    const res = await fetch(url);
    await res.arrayBuffer();
    return res.status === 200 ? true : undefined;
  } catch {
    return undefined;
  }
}

export interface KmsDaemon {
  child: Child;
  /** host:port of the HTTP API. */
  http: string;
  /** host:port of the TCP bridge, when started with one. */
  bridge: string | null;
  dataDir: string;
  masterKeyFile: string;
}

export interface KmsDaemonOptions {
  bridge?: boolean;
  /** Extra environment (e.g. PROGRESSDB_KMS_REGISTRY and PROGRESSDB_KMS_CLUSTER for a replica). */
  env?: Record<string, string>;
  /** A master key file to use (replicas of one cluster share one); a new one when omitted. */
  masterKeyFile?: string;
  /** The data dir to use (a restart reuses its predecessor's); a fresh one when omitted. */
  dataDir?: string;
  /** host:port of the HTTP API (a restart keeps its address); a free loopback port when omitted. */
  http?: string;
  /** Name of the child in messages. */
  name?: string;
}

/** Starts `progressdb-kms serve` on free loopback ports and waits for /healthz. */
export async function startKmsDaemon(ctx: BenchContext, opts: KmsDaemonOptions = {}): Promise<KmsDaemon> {
  requireFile(KMS_CLI, 'the external KMS daemon');
  const dir = ctx.tmp('kmsd-');
  const masterKeyFile = opts.masterKeyFile ?? path.join(dir, 'master.key');
  if (opts.masterKeyFile === undefined) await generateMasterKeyFile(masterKeyFile);
  const http = opts.http ?? `127.0.0.1:${await freePort()}`;
  const bridge = opts.bridge ? `127.0.0.1:${await freePort()}` : null;
  const dataDir = opts.dataDir ?? path.join(dir, 'kms');
  const args = ['serve', '--endpoint', http, '--data-dir', dataDir, '--master-key-file', masterKeyFile];
  if (bridge !== null) args.push('--bridge-endpoint', bridge);
  const child = spawnNode(opts.name ?? 'progressdb-kms', KMS_CLI, args, {
    env: cleanEnv(opts.env),
    cwd: dir,
  });
  try {
    await until(
      'the KMS daemon /healthz',
      async () => {
        child.checkAlive();
        return httpOk(`http://${http}/healthz`);
      },
      30_000,
    );
  } catch (err) {
    await child.kill9();
    throw err;
  }
  return { child, http, bridge, dataDir, masterKeyFile };
}

export interface ServerProc {
  child: Child;
  url: string;
  apiKey: string;
}

/** Starts the progressdb server (dist/src/cli/progressdb.js) like test/helpers/server.ts does. */
export async function startServerProcess(
  ctx: BenchContext,
  opts: { mode: 'embedded' | 'external' | 'off'; kmsEndpoint?: string; env?: Record<string, string> },
): Promise<ServerProc> {
  requireFile(SERVER_CLI, 'the progressdb server');
  const dataDir = ctx.tmp(`server-${opts.mode}-`);
  const apiKey = randomBytes(18).toString('base64url');
  const masterKey = path.join(dataDir, 'master.key');
  if (opts.mode === 'embedded') await generateMasterKeyFile(masterKey);
  const env = cleanEnv({
    PROGRESSDB_ADDR: '127.0.0.1:0',
    PROGRESSDB_DATA_DIR: dataDir,
    PROGRESSDB_API_KEYS: `bench:${apiKey}`,
    PROGRESSDB_ADMIN_KEY: randomBytes(18).toString('base64url'),
    PROGRESSDB_USE_ENCRYPTION: opts.mode === 'off' ? 'false' : 'true',
    PROGRESSDB_KMS_MODE: opts.mode === 'external' ? 'external' : 'embedded',
    PROGRESSDB_LOG_LEVEL: 'info',
    ...(opts.mode === 'embedded' && { PROGRESSDB_KMS_MASTER_KEY_FILE: masterKey }),
    ...(opts.mode === 'external' && opts.kmsEndpoint && { PROGRESSDB_KMS_ENDPOINT: opts.kmsEndpoint }),
    ...opts.env,
  });
  const child = spawnNode(`progressdb (${opts.mode})`, SERVER_CLI, [], { env, cwd: dataDir });
  const url = await child.jsonLine((entry) =>
    entry.msg === 'progressdb listening' && typeof entry.url === 'string' ? entry.url : undefined,
  );
  return { child, url, apiKey };
}

// --- HTTP load --------------------------------------------------------------------------------

export interface LoadResult {
  /** Completed 2xx requests per second. */
  reqPerSec: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  non2xx: number;
}

export interface LoadOptions {
  url: string;
  method?: 'GET' | 'POST' | 'PUT';
  headers?: Record<string, string>;
  body?: string;
  connections: number;
  /** Seconds (fractions allowed). */
  seconds: number;
  pipelining?: number;
  /** Per-request rewrite (e.g. to spread requests over several paths). */
  setupRequest?: (req: AutocannonRequest) => AutocannonRequest;
}

/** One autocannon run in this process (loopback only). */
export async function httpLoad(opts: LoadOptions): Promise<LoadResult> {
  const result = await autocannon({
    url: opts.url,
    method: opts.method ?? 'GET',
    headers: opts.headers ?? {},
    ...(opts.body !== undefined && { body: opts.body }),
    connections: opts.connections,
    pipelining: opts.pipelining ?? 1,
    duration: opts.seconds,
    // autocannon stops on its sampling tick (1 s by default): tick at the window's length so short
    // windows end on time; the rate below uses the measured duration either way.
    sampleInt: Math.max(50, Math.min(1000, Math.round(opts.seconds * 1000))),
    timeout: 30,
    ...(opts.setupRequest && { requests: [{ setupRequest: opts.setupRequest }] }),
  });
  const seconds = result.duration > 0 ? result.duration : opts.seconds;
  return {
    reqPerSec: result['2xx'] / seconds,
    p50Ms: result.latency.p50,
    p99Ms: result.latency.p99,
    errors: result.errors + result.timeouts,
    non2xx: result.non2xx,
  };
}

/** Fails loudly when a load run saw errors: a fast error path must never pass for throughput. */
export function checkLoad(what: string, r: LoadResult): LoadResult {
  if (r.errors > 0 || r.non2xx > 0 || r.reqPerSec === 0) {
    throw new Error(`${what}: ${r.errors} errors, ${r.non2xx} non-2xx responses, ${fmt(r.reqPerSec)} req/s`);
  }
  return r;
}

/**
 * Random payload bytes in their own ArrayBuffer (not a slice of Node's 8 KiB pool), so neither
 * the KMS nor a baseline clones more than it sends.
 */
export function payloadOf(bytes: number): Buffer {
  return Buffer.from(randomFillSync(new Uint8Array(bytes)).buffer);
}

export interface SeededDir {
  /** The KMS data dir (holds registry.mdb). */
  dataDir: string;
  masterKeyFile: string;
  deks: number;
  seedSeconds: number;
}

/**
 * A KMS data dir holding `n` thread DEKs, made once per run and shared by the rotation and
 * start-up cases: createDekForThread from 1024 concurrent loops, audit off (seeding is set-up,
 * not a measured figure; its rate is reported).
 */
export async function seededDir(ctx: BenchContext, n: number): Promise<SeededDir> {
  const key = `seeded:${n}`;
  const cached = ctx.fixtures.get(key) as SeededDir | undefined;
  if (cached !== undefined) return cached;
  const dir = ctx.tmp(`seed-${n}-`);
  const masterKeyFile = path.join(dir, 'master.key');
  await generateMasterKeyFile(masterKeyFile);
  const dataDir = path.join(dir, 'kms');
  const kms = await createKms({ dataDir, masterKeyFile, audit: false });
  const t0 = performance.now();
  let next = 0;
  let lastReport = t0;
  try {
    await Promise.all(
      Array.from({ length: 1024 }, async () => {
        for (let i = next++; i < n; i = next++) {
          await kms.createDekForThread(`bench-thread-${i}`);
          if (performance.now() - lastReport > 10_000) {
            lastReport = performance.now();
            ctx.progress(`  seeding: ${fmt(Math.min(next, n))}/${fmt(n)} DEKs`);
          }
        }
      }),
    );
  } finally {
    await kms.close();
  }
  const seedSeconds = (performance.now() - t0) / 1000;
  ctx.progress(`  seeded ${fmt(n)} DEKs in ${fmt(seedSeconds, 1)} s (${fmt(n / seedSeconds)} DEKs/s)`);
  const seeded = { dataDir, masterKeyFile, deks: n, seedSeconds };
  ctx.fixtures.set(key, seeded);
  return seeded;
}
