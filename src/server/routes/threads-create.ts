/** POST /v1/threads: a thread, its DEK provisioned before answering. The body is optional. */
import { z } from 'zod';
import { callContext } from '../context.js';
import { threadView } from '../service.js';
import { serverRoute } from './route.js';
import { threadView as threadSchema } from './views.js';

const MAX_TITLE_CHARS = 1_000;
const TITLE = `title must be a string of at most ${MAX_TITLE_CHARS} characters`;

export const threadsCreate = serverRoute({
  method: 'POST',
  path: '/v1/threads',
  scope: 'data',
  help: '{"title"?} → 201 the thread, with Location',
  reply: { statuses: [201], schema: threadSchema },
  body: z.strictObject(
    { title: z.string({ error: TITLE }).max(MAX_TITLE_CHARS, { error: TITLE }).nullish() },
    { error: 'body must be a JSON object' },
  ),
  bodyOptional: true,
  handle: async (ctx, { service }, { body }) => {
    const thread = await service.createThread(body.title ?? null, callContext(ctx));
    ctx.status = 201;
    ctx.set('Location', `/v1/threads/${thread.id}`);
    ctx.body = threadView(thread);
  },
});
