/** DELETE /v1/threads/:id/messages/:mid. */
import { serverRoute } from './route.js';
import { messageParams } from './schemas.js';

export const messagesDelete = serverRoute({
  method: 'DELETE',
  path: '/v1/threads/:id/messages/:mid',
  scope: 'data',
  help: '→ 204',
  reply: { statuses: [204] },
  params: messageParams,
  handle: async (ctx, { service }, { params }) => {
    await service.deleteMessage(params.id, params.mid);
    ctx.status = 204;
  },
});
