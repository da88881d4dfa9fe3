/**
 * What one KMS operation declares (src/ops/<op>.ts): its name, bridge op code, whether it is
 * idempotent or batchable, where it lives on the HTTP API, its JSON and bridge mappings in both
 * directions, and how it runs against a Kms. The daemon's routes and bridge dispatch, the bridge
 * codec and the remote client are all derived from these declarations (src/ops/index.ts).
 */

import type { CallContext, ItemResult, Kms } from '../api/index.js';
import { fromWire } from '../errors.js';
import type { BodyReader, FrameWriter } from '../wire/bridge-codec.js';
import type { JsonCodec, JsonRecord } from './fields.js';

/** A value's bridge encoding (positional: the bridge carries no field names). */
export interface BinaryCodec<T> {
  write(w: FrameWriter, v: T): void;
  read(r: BodyReader): T;
  /** Bytes `v` will take, or a little more, so its frame is allocated once. */
  sizeHint?(v: T): number;
}

/** A request's parameters on the bridge; read back with its op, so it is a KmsRequest. */
export interface RequestCodec<N extends string, P> {
  write(w: FrameWriter, params: P): void;
  read(r: BodyReader): { op: N } & P;
  sizeHint?(params: P): number;
}

export interface HttpSpec {
  method: 'GET' | 'POST';
  path: string;
  /** One line for the docs and the 404 listing. */
  help: string;
  /** Refuse request fields the op does not name (see SchemaOptions in http/field-schema.ts). */
  strict?: boolean;
  /** Appended to the refusal of an unknown field. */
  unknownFieldHint?: string;
  /**
   * The route belongs to the op's batch form (same method and path, which answers a single body
   * too); the daemon builds none for this op. On the bridge each form keeps its own code.
   */
  sharedRoute?: true;
}

/** What every op declares; SingleOp and BatchOp add their JSON mapping. */
export interface OpSpec<N extends string, P, Res> {
  readonly name: N;
  /** The metrics label, when it is not the name (both forms of reencrypt count as reencrypt). */
  readonly label?: string;
  /** Bridge frame type. Part of the wire contract: never renumber. */
  readonly code: number;
  /** Repeating it has no further effect: the remote client retries it after an unknown outcome. */
  readonly idempotent: boolean;
  /**
   * Not idempotent, yet a repeat after an unknown outcome harms nothing because the op stores
   * nothing (encrypt: the unanswered ciphertext is never used). The remote client repeats
   * idempotent and repeatable ops, on the same replica or another.
   */
  readonly repeatable?: true;
  readonly http: HttpSpec;
  readonly binary: { request: RequestCodec<N, P>; result: BinaryCodec<Res> };
  run(kms: Kms, params: P, ctx: CallContext): Promise<Res>;
}

/** An op taking named parameters (HTTP: JSON body, or query for GET) and answering one result. */
export interface SingleOp<N extends string, P, Res> extends OpSpec<N, P, Res> {
  readonly batch: false;
  readonly json: { request: JsonRecord<P>; result: JsonCodec<Res> };
}

/**
 * An op over items, each answered with its own result or error, in order. On HTTP a single
 * request is one item and `{"batch_input":[...]}` many; on the bridge every request is a list.
 */
export interface BatchOp<N extends string, I, R> extends OpSpec<N, { items: I[] }, ItemResult<R>[]> {
  readonly batch: true;
  readonly json: {
    item: JsonRecord<I>;
    /** `toJson`, when given, is exactly JSON.stringify(toWire(v)), built without the object. */
    result: JsonCodec<R> & { toJson?(v: R): string };
  };
}

// biome-ignore lint/suspicious/noExplicitAny: the catalogue holds ops of every parameter and result type
type Loose = any;
/** Any op, as the generic consumers (codec, routes, clients) see it: values typed by the op file. */
export type AnyOp = OpSpec<string, Loose, Loose> &
  (
    | Pick<SingleOp<string, Loose, Loose>, 'batch' | 'json'>
    | Pick<BatchOp<string, Loose, Loose>, 'batch' | 'json'>
  );

export type RequestOf<O> = O extends OpSpec<infer N, infer P, unknown> ? { op: N } & P : never;

interface BatchOpDefinition<N extends string, I, R> extends Omit<BatchOp<N, I, R>, 'batch' | 'binary'> {
  /** One item's bridge encoding; `minBytes` is its smallest encoding (bounds a forged count). */
  binary: { item: BinaryCodec<I> & { minBytes: number }; result: BinaryCodec<R> };
}

/** Bytes of an item error in a result frame, for the size hint. */
const ITEM_ERROR_HINT = 96;

/**
 * A batchable op from its item-level parts. Bridge bodies: `u32 count` then each item;
 * results `u32 count` then per item `u8 0` and its value, or `u8 1, str code, str message`.
 */
export function batchOp<N extends string, I, R>(def: BatchOpDefinition<N, I, R>): BatchOp<N, I, R> {
  const { item, result } = def.binary;
  const name = def.name;
  return {
    ...def,
    batch: true,
    binary: {
      request: {
        write: (w, { items }) => {
          w.u32(items.length);
          for (const it of items) item.write(w, it);
        },
        read: (r) => {
          const n = r.count(item.minBytes);
          const items = new Array<I>(n);
          for (let i = 0; i < n; i++) items[i] = item.read(r);
          return { op: name, items };
        },
        sizeHint: ({ items }) => {
          let n = 4;
          for (const it of items) n += item.sizeHint?.(it) ?? 128;
          return n;
        },
      },
      result: {
        write: (w, results) => {
          w.u32(results.length);
          for (const res of results) {
            if (res.ok) result.write(w.u8(0), res.value);
            else w.u8(1).str(res.error.code).str(res.error.message);
          }
        },
        read: (r) => {
          const n = r.count(1);
          const out = new Array<ItemResult<R>>(n);
          for (let i = 0; i < n; i++) {
            out[i] =
              r.u8() === 0
                ? { ok: true, value: result.read(r) }
                : { ok: false, error: fromWire(r.str(), r.str()) };
          }
          return out;
        },
        sizeHint: (results) => {
          let n = 4;
          for (const res of results) n += res.ok ? (result.sizeHint?.(res.value) ?? 128) : ITEM_ERROR_HINT;
          return n;
        },
      },
    },
  };
}

export function singleOp<N extends string, P, Res>(
  def: Omit<SingleOp<N, P, Res>, 'batch'>,
): SingleOp<N, P, Res> {
  return { ...def, batch: false };
}
