/** PUT /v1/threads/:id/messages/:mid: replaces a message's body (encrypted again). */
import { callContext } from '../context.js';
import { serverRoute } from './route.js';
import { messageBody, messageParams } from './schemas.js';
import { messageView } from './views.js';

export const messagesUpdate = serverRoute({
  method: 'PUT',
  path: '/v1/threads/:id/messages/:mid',
  scope: 'data',
  help: '{"body": <any JSON>} → the message',
  reply: { schema: messageView },
  params: messageParams,
  body: messageBody,
  handle: async (ctx, { service }, { params, body }) => {
    ctx.body = await service.updateMessage(params.id, params.mid, body.body, callContext(ctx));
  },
});
