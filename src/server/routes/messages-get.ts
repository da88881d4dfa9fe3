/** GET /v1/threads/:id/messages/:mid: one message, decrypted. */
import { callContext } from '../context.js';
import { serverRoute } from './route.js';
import { messageParams } from './schemas.js';
import { messageView } from './views.js';

export const messagesGet = serverRoute({
  method: 'GET',
  path: '/v1/threads/:id/messages/:mid',
  scope: 'data',
  help: '→ the message',
  reply: { schema: messageView },
  params: messageParams,
  handle: async (ctx, { service }, { params }) => {
    ctx.body = await service.getMessage(params.id, params.mid, callContext(ctx));
  },
});
