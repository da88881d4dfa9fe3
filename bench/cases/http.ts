/**
 * Case 3: the external daemon over HTTP, driven by autocannon with 50 connections. Single-item
 * POST /encrypt against a bare Koa endpoint echoing the same JSON body; batch_input of 64 items
 * (items/s) against the single-item ops/s; POST /create_dek_for_thread for threads never seen
 * before (a new thread id per request) against the single-item /encrypt rate (issue 12: ≥ 0.9×).
 */
import {
  alternate,
  type BenchContext,
  type CaseReport,
  checkLoad,
  childScript,
  fmt,
  httpLoad,
  medians,
  metric,
  payloadOf,
  spawnNode,
  startKmsDaemon,
} from '../lib.js';

export const caseNo = 3;
export const name = 'http';

const CONNECTIONS = 50;
const BATCH = 64;

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const daemon = await startKmsDaemon(ctx);
  const echo = spawnNode('koa echo', childScript('koa-echo'), []);
  try {
    const echoPort = await echo.jsonLine((l) => (typeof l.port === 'number' ? l.port : undefined));
    const base = `http://${daemon.http}`;
    const created = await fetch(`${base}/create_dek_for_thread`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ thread_id: 'bench-http' }),
    });
    const { key_id: keyId } = (await created.json()) as { key_id: string };
    if (created.status !== 200 || typeof keyId !== 'string')
      throw new Error(`create_dek_for_thread: ${created.status}`);
    const item = { key_id: keyId, plaintext: payloadOf(1024).toString('base64') };
    const headers = { 'content-type': 'application/json' };
    const single = JSON.stringify(item);
    const batch = JSON.stringify({ batch_input: Array.from({ length: BATCH }, () => item) });
    // Each autocannon run opens its connections anew: very short windows are mostly set-up.
    const seconds = Math.max(ctx.ms, ctx.mode === 'quick' ? 300 : 500) / 1000;
    const load = (what: string, url: string, body: string, s = seconds) =>
      httpLoad({ url, method: 'POST', headers, body, connections: CONNECTIONS, seconds: s }).then(
        (r) => checkLoad(what, r).reqPerSec,
      );
    let thread = 0;
    const createNew = (what: string, s = seconds) =>
      httpLoad({
        url: `${base}/create_dek_for_thread`,
        method: 'POST',
        headers,
        connections: CONNECTIONS,
        seconds: s,
        setupRequest: (req) => ({ ...req, body: `{"thread_id":"bench-new-${thread++}"}` }),
      }).then((r) => checkLoad(what, r).reqPerSec);
    // Warm-up: connections, JIT, worker caches on both servers.
    await load('koa echo warm-up', `http://127.0.0.1:${echoPort}/`, single, 0.5);
    await load('/encrypt warm-up', `${base}/encrypt`, single, 0.5);
    await load('/encrypt batch warm-up', `${base}/encrypt`, batch, 0.5);
    await createNew('/create_dek_for_thread warm-up', 0.5);
    const samples = await alternate(
      ctx.rounds,
      {
        koaEcho: () => load('koa echo', `http://127.0.0.1:${echoPort}/`, single),
        encrypt: () => load('/encrypt', `${base}/encrypt`, single),
        batchItems: async () => BATCH * (await load('/encrypt batch', `${base}/encrypt`, batch)),
        creates: () => createNew('/create_dek_for_thread'),
      },
      (r, last) =>
        ctx.progress(
          `  round ${r + 1}/${ctx.rounds}: koa echo ${fmt(last.koaEcho)} req/s, /encrypt ${fmt(last.encrypt)} req/s, ` +
            `batch ${fmt(last.batchItems)} items/s, new-thread creates ${fmt(last.creates)} req/s`,
        ),
    );
    const med = medians(samples);
    return {
      metrics: [
        metric({
          id: 'http_encrypt_single',
          caseNo,
          title: `POST /encrypt 1 KiB, ${CONNECTIONS} connections, vs bare Koa JSON echo`,
          figure: med.encrypt,
          figureLabel: '/encrypt',
          baseline: med.koaEcho,
          baselineLabel: 'Koa echo',
          unit: 'req/s',
          target: 0.8,
          better: 'higher',
        }),
        metric({
          id: 'http_encrypt_batch64',
          caseNo,
          title: `POST /encrypt batch_input of ${BATCH} (items/s) vs single-item ops/s`,
          figure: med.batchItems,
          figureLabel: `batch of ${BATCH}`,
          baseline: med.encrypt,
          baselineLabel: 'single /encrypt',
          unit: 'ops/s',
          target: 5,
          better: 'higher',
        }),
        metric({
          id: 'http_create_new_thread',
          caseNo,
          title: `POST /create_dek_for_thread for new threads, ${CONNECTIONS} connections, vs single /encrypt`,
          figure: med.creates,
          figureLabel: 'new-thread creates',
          baseline: med.encrypt,
          baselineLabel: 'single /encrypt',
          unit: 'req/s',
          target: 0.9,
          better: 'higher',
        }),
      ],
      details: { samples },
      notes: ['autocannon runs in the harness process; daemon and Koa echo are child processes'],
    };
  } finally {
    await echo.stop();
    await daemon.child.stop();
  }
}
