/** GET /v1/threads/:id/messages: a page of a thread's messages, decrypted. */
import { callContext } from '../context.js';
import { pagingQuery } from '../http.js';
import { serverRoute } from './route.js';
import { threadParams } from './schemas.js';
import { messagePage } from './views.js';

export const messagesList = serverRoute({
  method: 'GET',
  path: '/v1/threads/:id/messages',
  scope: 'data',
  help: '?limit&cursor → {"messages":[...],"next_cursor"}',
  reply: { schema: messagePage },
  params: threadParams,
  query: pagingQuery,
  handle: async (ctx, { service }, { params, query }) => {
    ctx.body = await service.listMessages(params.id, query.limit, query.cursor, callContext(ctx));
  },
});
