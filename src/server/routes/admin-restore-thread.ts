/** POST /admin/threads/restore: a thread deleted within the KMS's deletion window, back as it was. */

import { callContext } from '../context.js';
import { threadView } from '../service.js';
import { threadIdInput } from './admin-jobs.js';
import { serverRoute } from './route.js';

export const adminRestoreThread = serverRoute({
  method: 'POST',
  path: '/admin/threads/restore',
  scope: 'admin',
  help: '{"thread_id"} → the thread, its key and messages usable again; 404 if not pending deletion',
  body: threadIdInput('send {"thread_id": "<thread id>"}'),
  handle: async (ctx, { service }, { body }) => {
    ctx.body = threadView(await service.restoreThread(body.thread_id, callContext(ctx)));
  },
});
