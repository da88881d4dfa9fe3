/** GET /v1/threads/:id. */
import { threadView } from '../service.js';
import { serverRoute } from './route.js';
import { threadParams } from './schemas.js';
import { threadView as threadSchema } from './views.js';

export const threadsGet = serverRoute({
  method: 'GET',
  path: '/v1/threads/:id',
  scope: 'data',
  help: '→ the thread',
  reply: { schema: threadSchema },
  params: threadParams,
  handle: (ctx, { service }, { params }) => {
    ctx.body = threadView(service.thread(params.id));
  },
});
