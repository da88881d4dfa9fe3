/**
 * /admin/*: key rotation, encrypt-threads and health details. Always behind the admin key.
 * Long jobs answer 202 with their status at once; `?wait=true` answers 200 when they are done.
 */
import type { Context } from 'koa';
import type { RotationStatus } from '../../api/index.js';
import { toCodedError, UserError } from '../../errors.js';
import { callContext, type RouteGroup } from '../context.js';
import { isPlainObject, readJson, wantsWait } from '../http.js';
import { isId } from '../ids.js';
import { background, encryptThreadsView, rotationView } from '../jobs.js';

export function kekRotationView(s: RotationStatus) {
  return {
    state: s.state,
    kek_id: s.kekId,
    active_kek_version: s.activeKekVersion,
    target_kek_version: s.targetKekVersion,
    done: s.done,
    total: s.total,
    started_at: s.startedAt,
    finished_at: s.finishedAt,
    kek_versions: s.kekVersions,
  };
}

/** Starts a job, then either waits for it (200) or answers at once (202). */
async function runJob(ctx: Context, job: Promise<void>): Promise<void> {
  if (wantsWait(ctx)) {
    await job;
    ctx.status = 200;
  } else {
    background(job);
    ctx.status = 202;
  }
}

export const adminRoutes: RouteGroup = (router, parts) => {
  const { service, jobs, keys, config } = parts;
  const admin = keys.require('admin');

  router.post('/admin/encryption/rotate-kek', admin, async (ctx) => {
    const kms = service.requireKms();
    if (wantsWait(ctx)) {
      ctx.body = kekRotationView(await kms.rotateKek(callContext(ctx)));
    } else {
      ctx.status = 202;
      ctx.body = kekRotationView(await kms.startKekRotation(callContext(ctx)));
    }
  });

  router.get('/admin/encryption/rotate-kek', admin, async (ctx) => {
    ctx.body = kekRotationView(await service.requireKms().rotationStatus());
  });

  router.post('/admin/encryption/rotate-thread-dek', admin, async (ctx) => {
    const input = await readJson(ctx, config.maxBodyBytes);
    const threadId = isPlainObject(input) ? input.thread_id : undefined;
    if (typeof threadId !== 'string' || !isId(threadId)) {
      throw new UserError('INVALID_INPUT', 'send {"thread_id": "<thread id>"}');
    }
    service.requireKms();
    const { job, done } = jobs.startRotation(threadId);
    await runJob(ctx, done);
    ctx.body = rotationView(job);
  });

  router.get('/admin/encryption/rotate-thread-dek', admin, (ctx) => {
    const threadId = ctx.query.thread_id;
    if (typeof threadId !== 'string' || !isId(threadId)) {
      throw new UserError('INVALID_INPUT', 'pass ?thread_id=<thread id>');
    }
    const job = jobs.rotation(threadId);
    if (!job) throw new UserError('NOT_FOUND', 'no DEK rotation recorded for this thread');
    ctx.body = rotationView(job);
  });

  router.post('/admin/encryption/encrypt-threads', admin, async (ctx) => {
    const { job, done } = jobs.startEncryptThreads();
    await runJob(ctx, done);
    ctx.body = encryptThreadsView(job);
  });

  router.get('/admin/encryption/encrypt-threads', admin, (ctx) => {
    const job = jobs.encryptThreadsStatus();
    if (!job) throw new UserError('NOT_FOUND', 'encrypt-threads has not been run');
    ctx.body = encryptThreadsView(job);
  });

  router.get('/admin/health', admin, async (ctx) => {
    const { kms, startedAt } = parts;
    let kmsStatus: Record<string, unknown> | null = null;
    let ok = true;
    if (kms) {
      try {
        const h = await kms.health();
        ok = h.ok;
        kmsStatus = {
          ok: h.ok,
          mode: config.kmsMode,
          kek_id: h.kekId,
          active_kek_version: h.activeKekVersion,
          dek_count: h.dekCount,
          pool_threads: h.poolThreads,
          queue_depth: h.queueDepth,
          rotation: kekRotationView(h.rotation),
        };
      } catch (err) {
        ok = false;
        const e = toCodedError(err);
        kmsStatus = { ok: false, mode: config.kmsMode, error: { code: e.code, message: e.message } };
      }
    }
    const counts = service.store.counts();
    ctx.status = ok ? 200 : 503;
    ctx.body = {
      status: ok ? 'ok' : 'degraded',
      encryption: config.useEncryption,
      encryption_fields: config.encryptionFields?.map((p) => p.join('.')) ?? null,
      kms: kmsStatus,
      store: { threads: counts.threads, messages: counts.messages },
      jobs_running: jobs.runningCount(),
      uptime_seconds: Math.round((Date.now() - startedAt.getTime()) / 1000),
      pid: process.pid,
    };
  });
};
