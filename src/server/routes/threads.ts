/** /v1/threads: create (the DEK is provisioned before answering), list, get, delete. */
import { UserError } from '../../errors.js';
import { callContext, type RouteGroup } from '../context.js';
import { idParam, isPlainObject, pagingParams, readJson } from '../http.js';
import { threadView } from '../service.js';

const MAX_TITLE_CHARS = 1_000;

export const threadRoutes: RouteGroup = (router, { service, keys, config }) => {
  const auth = keys.require('data');

  router.post('/v1/threads', auth, async (ctx) => {
    const hasBody =
      ctx.request.length !== undefined ? ctx.request.length > 0 : ctx.get('transfer-encoding') !== '';
    const input = hasBody ? await readJson(ctx, config.maxBodyBytes) : {};
    if (!isPlainObject(input)) throw new UserError('INVALID_INPUT', 'body must be a JSON object');
    for (const key of Object.keys(input)) {
      if (key !== 'title') throw new UserError('INVALID_INPUT', `unknown field "${key}"`);
    }
    const title = input.title ?? null;
    if (title !== null && (typeof title !== 'string' || title.length > MAX_TITLE_CHARS)) {
      throw new UserError('INVALID_INPUT', `title must be a string of at most ${MAX_TITLE_CHARS} characters`);
    }
    const thread = await service.createThread(title, callContext(ctx));
    ctx.status = 201;
    ctx.set('Location', `/v1/threads/${thread.id}`);
    ctx.body = threadView(thread);
  });

  router.get('/v1/threads', auth, (ctx) => {
    const { limit, cursor } = pagingParams(ctx);
    const page = service.listThreads(limit, cursor);
    ctx.body = { threads: page.items.map(threadView), next_cursor: page.nextCursor };
  });

  router.get('/v1/threads/:id', auth, (ctx) => {
    ctx.body = threadView(service.thread(idParam(ctx, 'id')));
  });

  router.delete('/v1/threads/:id', auth, async (ctx) => {
    await service.deleteThread(idParam(ctx, 'id'), callContext(ctx));
    ctx.status = 204;
  });
};
