/**
 * Case 2: the external daemon over the TCP bridge (pipelined frames), one connection and several,
 * against the embedded KMS in this process; encrypt 1 KiB at 256 callers.
 */

import {
  alternate,
  type BenchContext,
  type CaseReport,
  closedLoop,
  fmt,
  medians,
  metric,
  payloadOf,
  startKmsDaemon,
  tempKms,
} from '../lib.js';
import { createRemoteKms, type Kms } from '../product.js';

export const caseNo = 2;
export const name = 'tcp';

const CALLERS = 256;

/** `callers` loops spread evenly over the clients (one TCP connection each). */
async function spread(clients: Kms[], keyId: string, payload: Buffer, ms: number): Promise<number> {
  const per = CALLERS / clients.length;
  const results = await Promise.all(clients.map((k) => closedLoop(per, ms, () => k.encrypt(keyId, payload))));
  return results.reduce((sum, r) => sum + r.opsPerSec, 0);
}

export async function run(ctx: BenchContext): Promise<CaseReport> {
  const payload = payloadOf(1024);
  const daemon = await startKmsDaemon(ctx, { bridge: true });
  const embedded = await tempKms();
  const connections = ctx.mode === 'quick' ? [1] : [1, 4];
  const clients = Array.from({ length: Math.max(...connections) }, () =>
    createRemoteKms({ endpoint: `tcp://${daemon.bridge!}`, transport: 'tcp' }),
  );
  try {
    const remoteKey = (await clients[0]!.createDekForThread('bench-tcp')).keyId;
    const localKey = (await embedded.kms.createDekForThread('bench-tcp')).keyId;
    for (const c of clients) await c.encrypt(remoteKey, payload);
    await spread(clients, remoteKey, payload, 200);
    await closedLoop(CALLERS, 200, () => embedded.kms.encrypt(localKey, payload));
    const steps: Record<string, () => Promise<number>> = {
      embedded: () =>
        closedLoop(CALLERS, ctx.ms, () => embedded.kms.encrypt(localKey, payload)).then((r) => r.opsPerSec),
    };
    for (const n of connections)
      steps[`tcp${n}`] = () => spread(clients.slice(0, n), remoteKey, payload, ctx.ms);
    const samples = await alternate(ctx.rounds, steps, (r, last) =>
      ctx.progress(
        `  round ${r + 1}/${ctx.rounds}: embedded ${fmt(last.embedded!)}/s, ` +
          connections.map((n) => `tcp x${n} ${fmt(last[`tcp${n}`]!)}/s`).join(', '),
      ),
    );
    const med = medians(samples);
    return {
      metrics: connections.map((n) =>
        metric({
          id: `tcp_bridge_${n}conn`,
          caseNo,
          title: `external encrypt 1 KiB over the TCP bridge (${n} connection(s), ${CALLERS} callers) vs embedded`,
          figure: med[`tcp${n}`]!,
          figureLabel: `tcp x${n}`,
          baseline: med.embedded!,
          baselineLabel: 'embedded@256',
          unit: 'ops/s',
          target: 0.7,
          better: 'higher',
        }),
      ),
      details: { samples },
      notes: [
        'the daemon runs as a child process with its default pool; the client loops run in the harness',
      ],
    };
  } finally {
    await Promise.all(clients.map((c) => c.close().catch(() => undefined)));
    await embedded.dispose();
    await daemon.child.stop();
  }
}
