/** POST /v1/threads/:id/messages: the body is encrypted with the thread's DEK before it is stored. */
import { callContext } from '../context.js';
import { serverRoute } from './route.js';
import { messageBody, threadParams } from './schemas.js';
import { messageView } from './views.js';

export const messagesCreate = serverRoute({
  method: 'POST',
  path: '/v1/threads/:id/messages',
  scope: 'data',
  help: '{"body": <any JSON>} → 201 the message, with Location',
  reply: { statuses: [201], schema: messageView },
  params: threadParams,
  body: messageBody,
  handle: async (ctx, { service }, { params, body }) => {
    const message = await service.createMessage(params.id, body.body, callContext(ctx));
    ctx.status = 201;
    ctx.set('Location', `/v1/threads/${params.id}/messages/${message.id}`);
    ctx.body = message;
  },
});
