/** /v1/threads/:id/messages: bodies are encrypted with the thread's DEK before they are stored. */
import type { Context } from 'koa';
import { UserError } from '../../errors.js';
import { callContext, type RouteGroup } from '../context.js';
import { idParam, isPlainObject, pagingParams, readJson } from '../http.js';

/** `{"body": <any JSON>}` and nothing else. */
async function messageBody(ctx: Context, limit: number): Promise<unknown> {
  const input = await readJson(ctx, limit);
  if (!isPlainObject(input) || !Object.hasOwn(input, 'body')) {
    throw new UserError('INVALID_INPUT', 'send {"body": <any JSON>}');
  }
  for (const key of Object.keys(input)) {
    if (key !== 'body') throw new UserError('INVALID_INPUT', `unknown field "${key}"`);
  }
  return input.body;
}

export const messageRoutes: RouteGroup = (router, { service, keys, config }) => {
  const auth = keys.require('data');

  router.post('/v1/threads/:id/messages', auth, async (ctx) => {
    const threadId = idParam(ctx, 'id');
    const body = await messageBody(ctx, config.maxBodyBytes);
    const message = await service.createMessage(threadId, body, callContext(ctx));
    ctx.status = 201;
    ctx.set('Location', `/v1/threads/${threadId}/messages/${message.id}`);
    ctx.body = message;
  });

  router.get('/v1/threads/:id/messages', auth, async (ctx) => {
    const threadId = idParam(ctx, 'id');
    const { limit, cursor } = pagingParams(ctx);
    ctx.body = await service.listMessages(threadId, limit, cursor, callContext(ctx));
  });

  router.get('/v1/threads/:id/messages/:mid', auth, async (ctx) => {
    ctx.body = await service.getMessage(idParam(ctx, 'id'), idParam(ctx, 'mid'), callContext(ctx));
  });

  router.put('/v1/threads/:id/messages/:mid', auth, async (ctx) => {
    const threadId = idParam(ctx, 'id');
    const messageId = idParam(ctx, 'mid');
    const body = await messageBody(ctx, config.maxBodyBytes);
    ctx.body = await service.updateMessage(threadId, messageId, body, callContext(ctx));
  });

  router.delete('/v1/threads/:id/messages/:mid', auth, async (ctx) => {
    await service.deleteMessage(idParam(ctx, 'id'), idParam(ctx, 'mid'));
    ctx.status = 204;
  });
};
