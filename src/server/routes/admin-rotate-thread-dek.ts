/** POST /admin/encryption/rotate-thread-dek: rotates a thread's DEK and re-encrypts its messages. */
import { rotationView } from '../jobs.js';
import { runJob, threadIdInput } from './admin-jobs.js';
import { serverRoute } from './route.js';

export const adminRotateThreadDek = serverRoute({
  method: 'POST',
  path: '/admin/encryption/rotate-thread-dek',
  scope: 'admin',
  help: '{"thread_id"} ?wait → 202 (200 when waited for) the DEK rotation job',
  reply: { statuses: [200, 202] },
  body: threadIdInput('send {"thread_id": "<thread id>"}'),
  handle: async (ctx, { service, jobs }, { body }) => {
    service.requireKms();
    const { job, done } = jobs.startRotation(body.thread_id);
    await runJob(ctx, done);
    ctx.body = rotationView(job);
  },
});
