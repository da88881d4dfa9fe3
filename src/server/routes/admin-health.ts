/** GET /admin/health: the server's and the KMS's state in detail; 503 when the KMS is not ok. */
import { toCodedError } from '../../errors.js';
import { rotationStatusView } from '../../ops/shapes.js';
import type { AppParts } from '../context.js';
import { serverRoute } from './route.js';

/** The KMS part of the answer; null when encryption is off. */
async function kmsHealth({ kms, config }: AppParts): Promise<{ ok: boolean; view: unknown }> {
  if (!kms) return { ok: true, view: null };
  try {
    const h = await kms.health();
    const view = {
      ok: h.ok,
      mode: config.kmsMode,
      kek_id: h.kekId,
      active_kek_version: h.activeKekVersion,
      dek_count: h.dekCount,
      pool_threads: h.poolThreads,
      queue_depth: h.queueDepth,
      rotation: rotationStatusView(h.rotation),
    };
    return { ok: h.ok, view };
  } catch (err) {
    const e = toCodedError(err);
    return {
      ok: false,
      view: { ok: false, mode: config.kmsMode, error: { code: e.code, message: e.message } },
    };
  }
}

export const adminHealth = serverRoute({
  method: 'GET',
  path: '/admin/health',
  scope: 'admin',
  help: '→ {"status","encryption","kms":{...},"store","jobs_running","uptime_seconds","pid"}',
  reply: { statuses: [200, 503] },
  handle: async (ctx, parts) => {
    const { service, jobs, config, startedAt } = parts;
    const kms = await kmsHealth(parts);
    const counts = service.store.counts();
    ctx.status = kms.ok ? 200 : 503;
    ctx.body = {
      status: kms.ok ? 'ok' : 'degraded',
      encryption: config.useEncryption,
      encryption_fields: config.encryptionFields?.map((p) => p.join('.')) ?? null,
      kms: kms.view,
      store: { threads: counts.threads, messages: counts.messages },
      jobs_running: jobs.runningCount(),
      uptime_seconds: Math.round((Date.now() - startedAt.getTime()) / 1000),
      pid: process.pid,
    };
  },
});
