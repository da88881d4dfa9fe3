/**
 * What the admin job routes share. Long jobs answer 202 with their status at once;
 * `?wait=true` answers 200 when they are done.
 */
import type { Context } from 'koa';
import { z } from 'zod';
import { idSchema } from '../http.js';
import { background } from '../jobs.js';

/** `?wait=true` (or `1`) on admin jobs. */
export function wantsWait(ctx: Context): boolean {
  const w = ctx.query.wait;
  return w === 'true' || w === '1';
}

/** Starts a job, then either waits for it (200) or answers at once (202). */
export async function runJob(ctx: Context, job: Promise<void>): Promise<void> {
  if (wantsWait(ctx)) {
    await job;
    ctx.status = 200;
  } else {
    background(job);
    ctx.status = 202;
  }
}

/** `{"thread_id"}` in a body, `?thread_id=` in a query. */
export function threadIdInput(message: string) {
  return z.object({ thread_id: idSchema(message) }, { error: message });
}
