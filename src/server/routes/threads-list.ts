/** GET /v1/threads: a page of threads, oldest first. */
import { pagingQuery } from '../http.js';
import { threadView } from '../service.js';
import { serverRoute } from './route.js';
import { threadPage } from './views.js';

export const threadsList = serverRoute({
  method: 'GET',
  path: '/v1/threads',
  scope: 'data',
  help: '?limit&cursor → {"threads":[...],"next_cursor"}',
  reply: { schema: threadPage },
  query: pagingQuery,
  handle: (ctx, { service }, { query }) => {
    const page = service.listThreads(query.limit, query.cursor);
    ctx.body = { threads: page.items.map(threadView), next_cursor: page.nextCursor };
  },
});
