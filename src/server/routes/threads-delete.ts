/** DELETE /v1/threads/:id: the thread, its messages and its DEK (after the KMS deletion window). */
import { callContext } from '../context.js';
import { serverRoute } from './route.js';
import { threadParams } from './schemas.js';

export const threadsDelete = serverRoute({
  method: 'DELETE',
  path: '/v1/threads/:id',
  scope: 'data',
  help: '→ 204; the thread is gone at once, its messages and DEK once the KMS deletion window ends',
  reply: { statuses: [204] },
  params: threadParams,
  handle: async (ctx, { service }, { params }) => {
    await service.deleteThread(params.id, callContext(ctx));
    ctx.status = 204;
  },
});
