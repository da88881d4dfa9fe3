/** GET /admin/encryption/encrypt-threads: the last encrypt-threads job, 404 if it never ran. */
import { UserError } from '../../errors.js';
import { encryptThreadsView } from '../jobs.js';
import { serverRoute } from './route.js';

export const adminEncryptThreadsStatus = serverRoute({
  method: 'GET',
  path: '/admin/encryption/encrypt-threads',
  scope: 'admin',
  help: '→ the encrypt-threads job, 404 if it never ran',
  handle: (ctx, { jobs }) => {
    const job = jobs.encryptThreadsStatus();
    if (!job) throw new UserError('NOT_FOUND', 'encrypt-threads has not been run');
    ctx.body = encryptThreadsView(job);
  },
});
