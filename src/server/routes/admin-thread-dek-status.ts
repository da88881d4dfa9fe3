/** GET /admin/encryption/rotate-thread-dek?thread_id=: the thread's last DEK rotation job. */
import { UserError } from '../../errors.js';
import { rotationView } from '../jobs.js';
import { threadIdInput } from './admin-jobs.js';
import { serverRoute } from './route.js';

export const adminThreadDekStatus = serverRoute({
  method: 'GET',
  path: '/admin/encryption/rotate-thread-dek',
  scope: 'admin',
  help: '?thread_id → the DEK rotation job, 404 if none ran',
  query: threadIdInput('pass ?thread_id=<thread id>'),
  handle: (ctx, { jobs }, { query }) => {
    const job = jobs.rotation(query.thread_id);
    if (!job) throw new UserError('NOT_FOUND', 'no DEK rotation recorded for this thread');
    ctx.body = rotationView(job);
  },
});
