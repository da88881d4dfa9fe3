/**
 * The daemon's field schemas: a record of named fields (id, base64, uint), precompiled into a
 * parser for a JSON object or a query string record. Cheaper per request than a general
 * validator, which matters on /encrypt; the server's routes, off the hot path, use zod
 * (check-input.ts). The schemas themselves are declared with each operation in src/ops/.
 */
import { type CodedError, kmsError } from '../errors.js';
import { decodeBase64Field } from '../wire/base64.js';

export type FieldKind = 'id' | 'base64' | 'uint';
export interface FieldSpec {
  kind: FieldKind;
  optional?: boolean;
  /** The property the parsed value is stored under (default: the field's name). */
  as?: string;
}
export type Schema = Record<string, FieldSpec>;

type ValueOf<F extends FieldSpec> = F['kind'] extends 'base64'
  ? Buffer
  : F['kind'] extends 'uint'
    ? number
    : string;
export type Parsed<S extends Schema> = {
  -readonly [K in keyof S]: S[K] extends { optional: true } ? ValueOf<S[K]> | undefined : ValueOf<S[K]>;
};

/** Identifiers (key ids, thread ids) are short printable strings. */
export const MAX_ID_LENGTH = 256;
export const UINT_STRING = /^\d{1,9}$/;

function invalid(field: string, why: string): CodedError {
  return kmsError('INVALID_INPUT', `field "${field}" ${why}`, { field });
}

function parseField(name: string, kind: FieldKind, value: unknown): string | Buffer | number {
  if (kind === 'uint') {
    // Numbers may arrive as JSON numbers or, like every response field, as decimal strings.
    if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return value;
    if (typeof value === 'string' && UINT_STRING.test(value)) return Number(value);
    throw invalid(name, 'must be a non-negative integer');
  }
  if (typeof value !== 'string') throw invalid(name, 'must be a string');
  if (kind === 'base64') return decodeBase64Field(value, name);
  if (value.length === 0 || value.length > MAX_ID_LENGTH) {
    throw invalid(name, `must be 1 to ${MAX_ID_LENGTH} characters`);
  }
  return value;
}

export interface SchemaOptions {
  /**
   * Refuse fields the schema does not name: a caller that sends an option we do not have (a
   * typo, or another KMS's API) learns it was not applied instead of getting a silent 200.
   */
  strict?: boolean;
  /** Appended to the refusal of an unknown field, to say what to do instead. */
  unknownFieldHint?: string;
}

/** Precompiles a schema into a parser for a JSON object (or a query string record). */
export function compileSchema<S extends Schema>(
  schema: S,
  options: SchemaOptions = {},
): (input: unknown) => Parsed<S> {
  const fields = Object.entries(schema).map(([name, spec]) => ({ name, ...spec }));
  const known = new Set(fields.map((f) => f.name));
  const hint = options.unknownFieldHint === undefined ? '' : `: ${options.unknownFieldHint}`;
  return (input) => {
    if (typeof input !== 'object' || input === null || Array.isArray(input)) {
      throw kmsError('INVALID_INPUT', 'expected a JSON object');
    }
    const record = input as Record<string, unknown>;
    if (options.strict) {
      for (const name of Object.keys(record)) {
        if (!known.has(name)) {
          // The name is the caller's text: quoted, and cut so a huge key cannot bloat the answer.
          throw invalid(name.slice(0, 64), `is not accepted here${hint}`);
        }
      }
    }
    const out: Record<string, unknown> = {};
    for (const f of fields) {
      const value = Object.hasOwn(record, f.name) ? record[f.name] : undefined;
      if (value === undefined || value === null) {
        if (!f.optional) throw invalid(f.name, 'is required');
        out[f.as ?? f.name] = undefined;
      } else {
        out[f.as ?? f.name] = parseField(f.name, f.kind, value);
      }
    }
    return out as Parsed<S>;
  };
}
