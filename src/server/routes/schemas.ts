/** Input schemas more than one route declares. */
import { z } from 'zod';
import { idParamSchema } from '../http.js';

/** `/v1/threads/:id`. */
export const threadParams = z.object({ id: idParamSchema('id') });

/** `/v1/threads/:id/messages/:mid`. */
export const messageParams = z.object({ id: idParamSchema('id'), mid: idParamSchema('mid') });

const MESSAGE_BODY = 'send {"body": <any JSON>}';

/** `{"body": <any JSON>}` and nothing else. */
export const messageBody = z.strictObject(
  { body: z.unknown().refine((v) => v !== undefined, { error: MESSAGE_BODY }) },
  { error: MESSAGE_BODY },
);
