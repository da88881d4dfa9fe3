/**
 * Checking a request's input against a route's zod schema. A refusal is INVALID_INPUT with the
 * message of the first problem: the schema's own words (each route writes what to send instead),
 * or `unknown field "x"` for a field a strict schema does not name.
 */
import type { z } from 'zod';
import { UserError } from '../errors.js';

export function checkInput<S extends z.ZodType>(schema: S, input: unknown): z.output<S> {
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  if (issue?.code === 'unrecognized_keys') {
    throw new UserError('INVALID_INPUT', `unknown field "${issue.keys[0]}"`);
  }
  throw new UserError('INVALID_INPUT', issue?.message ?? 'invalid input');
}
