/**
 * The HTTP API's JSON fields, each named once. A record of fields gives the daemon its input
 * schema (compileSchema) and its result writer, and the client its request writer and result
 * reader. Every value travels as a JSON string (numbers in decimal, binary as standard base64,
 * lists of versions comma-separated), so clients in any language read them the same way.
 */
import { kmsError } from '../errors.js';
import type { FieldSpec, Schema } from '../http/field-schema.js';
import { decodeBase64Field, encodeBase64 } from '../wire/base64.js';

export type WireObject = Record<string, unknown>;

/**
 * What a field's JSON value is, for the OpenAPI document (kms-server/openapi.ts): a string, a
 * decimal number or a comma-separated list of them as a string, standard base64, "true"/"false",
 * one of a set of strings, or an object of its own fields.
 */
export type WireType =
  | 'string'
  | 'decimal'
  | 'decimals'
  | 'base64'
  | 'boolean'
  | { readonly oneOf: readonly string[] }
  /** Fields unknown (a codec that lists none): any object. */
  | { readonly object: readonly Field<unknown>[] | undefined };

export interface Field<V> {
  /** The JSON name. */
  readonly name: string;
  /** Absent on the wire ↔ undefined (requests) or null (results). */
  readonly optional: boolean;
  /** How the daemon checks the field in a request; result-only fields have none. */
  readonly input?: FieldSpec['kind'];
  /** Its JSON value, as the daemon writes it. */
  readonly type: WireType;
  /** The JSON value written for `v`. */
  write(v: V): unknown;
  /** Reads the field from a daemon answer; a missing or malformed value is the daemon's fault. */
  read(o: WireObject): V;
}

function badResponse(field: string): Error {
  return kmsError('INTERNAL', `unexpected response from the KMS daemon: field "${field}"`);
}

function wireString(o: WireObject, field: string): string {
  const v = o[field];
  if (typeof v !== 'string') throw badResponse(field);
  return v;
}

const UINT = /^\d{1,15}$/;

function parseUint(v: string, field: string): number {
  if (!UINT.test(v)) throw badResponse(field);
  return Number(v);
}

function field<V>(
  name: string,
  input: FieldSpec['kind'] | undefined,
  type: WireType,
  write: (v: V) => unknown,
  read: (o: WireObject) => V,
): Field<V> {
  return input === undefined
    ? { name, optional: false, type, write, read }
    : { name, optional: false, input, type, write, read };
}

/** An identifier (key id, thread id): 1 to 256 characters in a request. */
export function id(name: string): Field<string> {
  return field(
    name,
    'id',
    'string',
    (v) => v,
    (o) => wireString(o, name),
  );
}

/** Any string (results only). */
export function text(name: string): Field<string> {
  return field(
    name,
    undefined,
    'string',
    (v) => v,
    (o) => wireString(o, name),
  );
}

export function uint(name: string): Field<number> {
  return field(name, 'uint', 'decimal', String, (o) => parseUint(wireString(o, name), name));
}

export function base64(name: string): Field<Buffer> {
  return field(name, 'base64', 'base64', encodeBase64, (o) => {
    try {
      return decodeBase64Field(wireString(o, name), name);
    } catch {
      throw badResponse(name);
    }
  });
}

/** Versions as "1,2,3" ("" for none; results only). */
export function uintList(name: string): Field<number[]> {
  return field(
    name,
    undefined,
    'decimals',
    (v) => v.join(','),
    (o) => {
      const v = wireString(o, name);
      return v === '' ? [] : v.split(',').map((part) => parseUint(part, name));
    },
  );
}

/** "true" / "false" (results only). */
export function bool(name: string): Field<boolean> {
  return field(name, undefined, 'boolean', String, (o) => wireString(o, name) === 'true');
}

/** One of a fixed set of strings (results only). */
export function oneOf<V extends string>(name: string, values: readonly V[]): Field<V> {
  const known = new Set<string>(values);
  return field(
    name,
    undefined,
    { oneOf: values },
    (v) => v,
    (o) => {
      const v = wireString(o, name);
      if (!known.has(v)) throw badResponse(name);
      return v as V;
    },
  );
}

/** A JSON object written and read by its own record (results only). */
export function nested<V>(name: string, record: JsonCodec<V>): Field<V> {
  return field(name, undefined, { object: record.fields }, record.toWire, (o) => {
    const v = o[name];
    if (typeof v !== 'object' || v === null) throw badResponse(name);
    return record.fromWire(v as WireObject);
  });
}

/** Left out of a request when undefined. */
export function optional<V>(f: Field<V>): Field<V | undefined> {
  return { ...f, optional: true, read: (o) => (o[f.name] === undefined ? undefined : f.read(o)) };
}

/** Left out of a result when null. */
export function nullable<V>(f: Field<V>): Field<V | null> {
  return { ...f, optional: true, read: (o) => (o[f.name] === undefined ? null : f.read(o)) };
}

/** A value's JSON object form: written by the daemon (results) or the client (requests). */
export interface JsonCodec<T> {
  toWire(v: T): WireObject;
  /** Reads a daemon's answer (client side). */
  fromWire(o: WireObject): T;
  /** The fields toWire writes, in order, for the OpenAPI document. */
  readonly fields?: readonly Field<unknown>[];
}

/** A JSON object of named fields, mapped to and from `T` (whose property order is the JSON order). */
export interface JsonRecord<T> extends JsonCodec<T> {
  /** The daemon's input schema; each field is parsed straight into its property of `T`. */
  readonly schema: Schema;
}

export type Fields<T> = { readonly [P in keyof T]-?: Field<T[P]> };

export function record<T>(fields: Fields<T>): JsonRecord<T> {
  const entries = Object.entries(fields) as [string, Field<unknown>][];
  const schema: Schema = {};
  for (const [prop, f] of entries) {
    if (f.input !== undefined) schema[f.name] = { kind: f.input, optional: f.optional, as: prop };
  }
  return {
    schema,
    fields: entries.map(([, f]) => f),
    toWire: (v) => {
      const out: WireObject = {};
      for (const [prop, f] of entries) {
        const value = (v as Record<string, unknown>)[prop];
        if (f.optional && (value === undefined || value === null)) continue;
        out[f.name] = f.write(value);
      }
      return out;
    },
    fromWire: (o) => {
      const out: Record<string, unknown> = {};
      for (const [prop, f] of entries) out[prop] = f.read(o);
      return out as T;
    },
  };
}

/**
 * The same JSON names in the same order as `record(fields)`, with each value as the native JSON
 * type of its property (numbers, lists, null when absent) rather than a string: how the product
 * server's admin API shows values the daemon sends as strings. For records of plain values only.
 */
export function plainView<T>(fields: Fields<T>): (v: T) => WireObject {
  const entries = Object.entries(fields) as [string, Field<unknown>][];
  return (v) => {
    const out: WireObject = {};
    for (const [prop, f] of entries) out[f.name] = (v as Record<string, unknown>)[prop] ?? null;
    return out;
  };
}

/** A value carried as the one field of a JSON object (decrypt's `{"plaintext"}`). */
export function single<V>(f: Field<V>): JsonCodec<V> {
  return {
    fields: [f as Field<unknown>],
    toWire: (v) => ({ [f.name]: f.write(v) }),
    fromWire: (o) => f.read(o),
  };
}
