/**
 * Case 7: the progressdb server end to end over HTTP (autocannon): create messages and read pages
 * back, with body encryption on (embedded KMS; external KMS over the TCP bridge, and over HTTP in
 * normal/full runs) against encryption off. Every server is a child process on a loopback port.
 */
import {
  alternate,
  type BenchContext,
  type CaseReport,
  checkLoad,
  fmt,
  httpLoad,
  type Metric,
  medians,
  metric,
  type ServerProc,
  startKmsDaemon,
  startServerProcess,
} from '../lib.js';

export const caseNo = 7;
export const name = 'server';

/** Threads with a full page each, for the reads. */
const THREADS = 16;
/**
 * Threads the creates spread over (issue 12: a server's traffic spans thousands of thread keys,
 * not 16): each create goes to the next of them, so every DEK is used a few times per run.
 */
const CREATE_THREADS = 10_000;
const PAGE = 50;
const CONNECTIONS = 32;

async function call(proc: ServerProc, method: string, urlPath: string, json?: unknown): Promise<unknown> {
  const res = await fetch(`${proc.url}${urlPath}`, {
    method,
    headers: { authorization: `Bearer ${proc.apiKey}`, 'content-type': 'application/json' },
    ...(json !== undefined && { body: JSON.stringify(json) }),
  });
  const text = await res.text();
  if (res.status >= 300) throw new Error(`${method} ${urlPath}: ${res.status} ${text.slice(0, 200)}`);
  return text === '' ? null : JSON.parse(text);
}

interface Prepared {
  proc: ServerProc;
  /** Threads with a full first page each, so every read decrypts PAGE bodies. */
  threads: string[];
  /** Threads the creates cycle over (the first ones are `threads`). */
  createThreads: string[];
}

/** Makes `count` threads, 32 requests at a time. */
async function makeThreads(proc: ServerProc, count: number): Promise<string[]> {
  const threads: string[] = new Array(count);
  let next = 0;
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      for (let t = next++; t < count; t = next++) {
        const created = (await call(proc, 'POST', '/v1/threads', { title: `bench ${t}` })) as { id: string };
        threads[t] = created.id;
      }
    }),
  );
  return threads;
}

async function prepare(
  proc: ServerProc,
  body: unknown,
  count: number,
  createCount: number,
): Promise<Prepared> {
  const createThreads = await makeThreads(proc, Math.max(count, createCount));
  const threads = createThreads.slice(0, count);
  await Promise.all(
    threads.map(async (id) => {
      for (let m = 0; m < PAGE; m++) await call(proc, 'POST', `/v1/threads/${id}/messages`, { body });
    }),
  );
  return { proc, threads, createThreads };
}

function cycle(paths: string[]) {
  let i = 0;
  return <T extends object>(req: T): T => ({ ...req, path: paths[i++ % paths.length]! });
}

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const body = { text: 'x'.repeat(1000), n: 1 };
  const daemon = await startKmsDaemon(ctx, { bridge: true });
  const procs: ServerProc[] = [];
  const start = async (...args: Parameters<typeof startServerProcess>) => {
    const p = await startServerProcess(...args);
    procs.push(p);
    return p;
  };
  try {
    const threads = ctx.mode === 'quick' ? THREADS / 2 : THREADS;
    const createThreads = ctx.mode === 'quick' ? 500 : CREATE_THREADS;
    const wanted: [string, Parameters<typeof startServerProcess>[1]][] = [
      ['off', { mode: 'off' }],
      ['embedded', { mode: 'embedded' }],
      ['external_tcp', { mode: 'external', kmsEndpoint: `tcp://${daemon.bridge!}` }],
    ];
    if (ctx.mode !== 'quick') {
      wanted.push(['external_http', { mode: 'external', kmsEndpoint: `http://${daemon.http}` }]);
    }
    const variants: Record<string, Prepared> = Object.fromEntries(
      await Promise.all(
        wanted.map(
          async ([vName, opts]) =>
            [vName, await prepare(await start(ctx, opts), body, threads, createThreads)] as const,
        ),
      ),
    );
    // Each autocannon run opens its connections anew: very short windows are mostly set-up.
    const seconds = Math.max(ctx.ms, ctx.mode === 'quick' ? 300 : 500) / 1000;
    const create = (v: Prepared, s = seconds) =>
      httpLoad({
        url: v.proc.url,
        method: 'POST',
        headers: { authorization: `Bearer ${v.proc.apiKey}`, 'content-type': 'application/json' },
        body: JSON.stringify({ body }),
        connections: CONNECTIONS,
        seconds: s,
        setupRequest: cycle(v.createThreads.map((id) => `/v1/threads/${id}/messages`)),
      }).then((r) => checkLoad('create message', r).reqPerSec);
    const read = (v: Prepared, s = seconds) =>
      httpLoad({
        url: v.proc.url,
        headers: { authorization: `Bearer ${v.proc.apiKey}` },
        connections: CONNECTIONS,
        seconds: s,
        setupRequest: cycle(v.threads.map((id) => `/v1/threads/${id}/messages?limit=${PAGE}`)),
      }).then((r) => checkLoad('read page', r).reqPerSec);
    const steps: Record<string, () => Promise<number>> = {};
    for (const [vName, v] of Object.entries(variants)) {
      await create(v, 0.3);
      await read(v, 0.3);
      steps[`${vName}:create`] = () => create(v);
      steps[`${vName}:read`] = () => read(v);
    }
    const samples = await alternate(ctx.rounds, steps, (r, last) =>
      ctx.progress(
        `  round ${r + 1}/${ctx.rounds}: ` +
          Object.keys(variants)
            .map((v) => `${v} create ${fmt(last[`${v}:create`]!)}/s read ${fmt(last[`${v}:read`]!)}/s`)
            .join(', '),
      ),
    );
    const med = medians(samples);
    const metrics: Metric[] = [];
    for (const vName of Object.keys(variants).filter((v) => v !== 'off')) {
      for (const op of ['create', 'read'] as const) {
        metrics.push(
          metric({
            id: `server_${vName}_${op}`,
            caseNo,
            title: `server ${op === 'create' ? 'create message' : `read page of ${PAGE}`}, encryption ${vName} vs off`,
            figure: med[`${vName}:${op}`]!,
            figureLabel: vName,
            baseline: med[`off:${op}`]!,
            baselineLabel: 'encryption off',
            unit: 'req/s',
            target: 0.8,
            better: 'higher',
          }),
        );
      }
    }
    return {
      metrics,
      details: { samples, threads, createThreads, pageSize: PAGE, connections: CONNECTIONS },
      notes: [
        `~1 KiB JSON bodies, ${CONNECTIONS} connections; creates cycle over ${fmt(createThreads)} threads, ` +
          `reads are pages of ${PAGE} from ${threads} threads` +
          (ctx.mode === 'quick' ? '; quick runs skip the external-over-HTTP server' : ''),
      ],
    };
  } finally {
    await Promise.all(procs.map((p) => p.child.stop()));
    await daemon.child.stop();
  }
}
