/** GET /admin/threads/pending-deletion: deleted threads whose key waits out the KMS's deletion window. */
import { serverRoute } from './route.js';

export const adminPendingDeletions = serverRoute({
  method: 'GET',
  path: '/admin/threads/pending-deletion',
  scope: 'admin',
  help: '→ {"threads":[{"id","title","deletion_due_at","messages",...}]}: restorable until then',
  handle: (ctx, { service }) => {
    service.requireKms();
    ctx.body = { threads: service.pendingDeletions() };
  },
});
