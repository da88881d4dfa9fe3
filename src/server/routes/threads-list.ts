/** GET /v1/threads: a page of threads, oldest first. */
import { pagingQuery } from '../http.js';
import { threadView } from '../service.js';
import { serverRoute } from './route.js';

export const threadsList = serverRoute({
  method: 'GET',
  path: '/v1/threads',
  scope: 'data',
  help: '?limit&cursor → {"threads":[...],"next_cursor"}',
  query: pagingQuery,
  handle: (ctx, { service }, { query }) => {
    const page = service.listThreads(query.limit, query.cursor);
    ctx.body = { threads: page.items.map(threadView), next_cursor: page.nextCursor };
  },
});
