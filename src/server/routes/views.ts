/**
 * The answers of the thread and message routes as zod schemas, for the OpenAPI document; each is
 * checked against the view type service.ts builds, and test/openapi.test.ts checks real answers
 * against the documented form.
 */
import { z } from 'zod';
import { ID_PATTERN } from '../ids.js';
import type { MessageView, ThreadView } from '../service.js';

const id = z.string().regex(ID_PATTERN);
const time = z.iso.datetime();

export const threadView = z.object({
  id,
  title: z.string().nullable(),
  encrypted: z.boolean(),
  created_at: time,
  updated_at: time,
}) satisfies z.ZodType<ThreadView>;

export const messageView = z.object({
  id,
  thread_id: id,
  body: z.unknown().optional().describe('the JSON body as written; absent when it cannot be decrypted'),
  error: z
    .object({ code: z.string(), message: z.string() })
    .optional()
    .describe('why the body is absent (e.g. DECRYPT_FAILED)'),
  encrypted: z.boolean(),
  created_at: time,
  updated_at: time,
}) satisfies z.ZodType<MessageView>;

const nextCursor = id.nullable().describe('pass as ?cursor= for the next page; null on the last');

export const threadPage = z.object({ threads: z.array(threadView), next_cursor: nextCursor });

export const messagePage = z.object({ messages: z.array(messageView), next_cursor: nextCursor });

export const ready = z.object({ status: z.literal('ok') });
