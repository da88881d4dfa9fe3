/** POST /admin/encryption/encrypt-threads: encrypts the messages stored before encryption was on. */
import { encryptThreadsView } from '../jobs.js';
import { runJob } from './admin-jobs.js';
import { serverRoute } from './route.js';

export const adminEncryptThreads = serverRoute({
  method: 'POST',
  path: '/admin/encryption/encrypt-threads',
  scope: 'admin',
  help: '?wait → 202 (200 when waited for) the encrypt-threads job',
  reply: { statuses: [200, 202] },
  handle: async (ctx, { jobs }) => {
    const { job, done } = jobs.startEncryptThreads();
    await runJob(ctx, done);
    ctx.body = encryptThreadsView(job);
  },
});
