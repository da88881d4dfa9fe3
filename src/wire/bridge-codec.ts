/**
 * The TCP bridge wire format, shared by the daemon's bridge listener and the TCP client.
 *
 * Frame (all integers big-endian):
 *   u32 length   bytes that follow this field (5 + body length)
 *   u32 id       request id chosen by the client; the answer carries the same id. 0 = connection
 *   u8  type     an op code (request), AUTH, RESULT or ERROR
 *   ... body     the fields of that type, in order; binary fields are raw bytes
 *
 * Field encodings: u32; f64 (counts); str = u32 byte length + UTF-8; bytes = u32 length + raw;
 * optional bytes/u32 use 0xFFFFFFFF for "absent". A body must be consumed exactly: trailing or
 * missing bytes make the frame malformed. Op codes are part of the wire contract: never renumber.
 */
import { type CodedError, type ErrorCode, fromWire, kmsError } from '../errors.js';
import { MAX_AAD_BYTES, MAX_CIPHERTEXT_BYTES, MAX_ID_LENGTH } from '../kms/validate-args.js';
import { type KmsOp, type KmsRequest, OP_BY_CODE, opOf } from '../ops/index.js';

export const FRAME_LENGTH_BYTES = 4;
/** id (u32) + type (u8): the part of the header counted in `length`. */
export const FRAME_HEADER_BYTES = 5;
/** A `str` field holding the longest id: u32 length, then at most 3 UTF-8 bytes per UTF-16 unit. */
const MAX_ID_FIELD_BYTES = 4 + MAX_ID_LENGTH * 3;
/**
 * The largest frame (after its length prefix) that one operation on the largest input the KMS
 * accepts needs: a decrypt of one item with the longest id, the largest ciphertext and the
 * largest AAD (count, id, ciphertext, AAD). Every answer to it is smaller, and the client splits
 * batches into far smaller frames.
 */
export const MAX_OP_FRAME_BYTES =
  FRAME_HEADER_BYTES + 4 + MAX_ID_FIELD_BYTES + 4 + MAX_CIPHERTEXT_BYTES + 4 + MAX_AAD_BYTES;
/** The daemon's default frame limit (authenticated connections only): any single call fits. */
export const DEFAULT_MAX_FRAME_BYTES = MAX_OP_FRAME_BYTES;

export { OP_CODES } from '../ops/index.js';

/** Client → daemon, body `str token`; answered by an empty RESULT or an ERROR (then close). */
export const FRAME_AUTH = 0x20;
/** Daemon → client: the result of the request with this id; body depends on that request's op. */
export const FRAME_RESULT = 0x80;
/** Daemon → client: body `str code, str message`; id 0 means the whole connection failed. */
export const FRAME_ERROR = 0x81;

const ABSENT = 0xffffffff;

export function opOfCode(code: number): KmsOp | undefined {
  return OP_BY_CODE.get(code)?.name;
}

export function malformed(message: string): CodedError {
  return kmsError('MALFORMED_FRAME', message);
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/** Builds one frame in a growable buffer; `finish` patches the length and returns it. */
export class FrameWriter {
  private buf: Buffer;
  private pos = FRAME_LENGTH_BYTES + FRAME_HEADER_BYTES;

  constructor(id: number, type: number, sizeHint = 256) {
    this.buf = Buffer.allocUnsafe(Math.max(64, sizeHint + this.pos));
    this.buf.writeUInt32BE(id >>> 0, 4);
    this.buf[8] = type;
  }

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const next = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n));
    this.buf.copy(next, 0, 0, this.pos);
    this.buf = next;
  }

  u8(v: number): this {
    this.ensure(1);
    this.buf[this.pos++] = v;
    return this;
  }

  u32(v: number): this {
    this.ensure(4);
    this.buf.writeUInt32BE(v >>> 0, this.pos);
    this.pos += 4;
    return this;
  }

  f64(v: number): this {
    this.ensure(8);
    this.buf.writeDoubleBE(v, this.pos);
    this.pos += 8;
    return this;
  }

  bytes(v: Uint8Array): this {
    this.u32(v.byteLength);
    this.ensure(v.byteLength);
    this.buf.set(v, this.pos);
    this.pos += v.byteLength;
    return this;
  }

  optBytes(v: Uint8Array | undefined): this {
    return v === undefined ? this.u32(ABSENT) : this.bytes(v);
  }

  optU32(v: number | null): this {
    return this.u32(v === null ? ABSENT : v);
  }

  str(v: string): this {
    const max = Buffer.byteLength(v);
    this.ensure(4 + max);
    const n = this.buf.write(v, this.pos + 4, 'utf8');
    this.buf.writeUInt32BE(n, this.pos);
    this.pos += 4 + n;
    return this;
  }

  optStr(v: string | null): this {
    return v === null ? this.u32(ABSENT) : this.str(v);
  }

  finish(): Buffer {
    this.buf.writeUInt32BE(this.pos - FRAME_LENGTH_BYTES, 0);
    return this.buf.subarray(0, this.pos);
  }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/** Reads a frame body; every read is bounds-checked and fails with MALFORMED_FRAME. */
export class BodyReader {
  private pos = 0;

  constructor(private readonly buf: Buffer) {}

  private need(n: number): void {
    if (this.pos + n > this.buf.length) throw malformed('frame body is truncated');
  }

  u8(): number {
    this.need(1);
    // In bounds: need(1) checked that one byte remains.
    return this.buf[this.pos++] as number;
  }

  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }

  f64(): number {
    this.need(8);
    const v = this.buf.readDoubleBE(this.pos);
    this.pos += 8;
    if (!Number.isSafeInteger(v) || v < 0) throw malformed('count is not a non-negative integer');
    return v;
  }

  private slice(n: number): Buffer {
    this.need(n);
    const v = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }

  bytes(): Buffer {
    return this.slice(this.u32());
  }

  optBytes(): Buffer | undefined {
    const n = this.u32();
    return n === ABSENT ? undefined : this.slice(n);
  }

  optU32(): number | null {
    const n = this.u32();
    return n === ABSENT ? null : n;
  }

  str(): string {
    return this.slice(this.u32()).toString('utf8');
  }

  optStr(): string | null {
    const n = this.u32();
    return n === ABSENT ? null : this.slice(n).toString('utf8');
  }

  /** Item counts are bounded by the bytes left, so a forged count cannot make us loop for long. */
  count(minItemBytes: number): number {
    const n = this.u32();
    if (n * minItemBytes > this.buf.length - this.pos) throw malformed('item count exceeds frame size');
    return n;
  }

  end(): void {
    if (this.pos !== this.buf.length) throw malformed('frame body has trailing bytes');
  }
}

export interface Frame {
  id: number;
  type: number;
  body: Buffer;
}

/**
 * Bytes held in unfinished frames, shared by every connection of a listener: a frame is only
 * buffered across chunks when its whole size fits, so the daemon's memory for partial frames is
 * bounded by `limit`, not by connections × max frame size.
 */
export class FrameBudget {
  used = 0;

  constructor(readonly limit: number) {}

  reserve(bytes: number): boolean {
    if (this.used + bytes > this.limit) return false;
    this.used += bytes;
    return true;
  }

  release(bytes: number): void {
    this.used -= bytes;
  }
}

/**
 * Splits a byte stream into frames. Complete frames inside one chunk are sliced without copying;
 * a frame spanning chunks is copied once into a buffer of its final size. The length is checked
 * against the limit before any of the body is buffered.
 */
export class FrameDecoder {
  /** Fewer than 4 bytes of a length prefix. */
  private head: Buffer | null = null;
  /** A frame being filled across chunks (length prefix included). */
  private partial: Buffer | null = null;
  private filled = 0;

  /**
   * `maxFrameBytes` may be changed between pushes (the daemon accepts only a small AUTH frame
   * until a connection is authenticated); `budget`, when given, must cover every partial frame.
   */
  constructor(
    public maxFrameBytes: number,
    private readonly budget?: FrameBudget,
  ) {}

  /** True when some bytes of an unfinished frame are buffered. */
  get midFrame(): boolean {
    return this.head !== null || this.partial !== null;
  }

  /** Calls `onFrame` for each complete frame; throws a CodedError on a bad length prefix. */
  push(chunk: Buffer, onFrame: (frame: Frame) => void): void {
    let buf = chunk;
    if (this.partial) {
      const n = Math.min(buf.length, this.partial.length - this.filled);
      buf.copy(this.partial, this.filled, 0, n);
      this.filled += n;
      buf = buf.subarray(n);
      if (this.filled < this.partial.length) return;
      const whole = this.partial;
      this.dropPartial();
      onFrame(this.frameOf(whole));
    }
    if (this.head) {
      buf = Buffer.concat([this.head, buf]);
      this.head = null;
    }
    while (buf.length >= FRAME_LENGTH_BYTES) {
      const length = buf.readUInt32BE(0);
      if (length > this.maxFrameBytes) {
        throw kmsError(
          'PAYLOAD_TOO_LARGE',
          `frame of ${length} bytes exceeds the limit of ${this.maxFrameBytes}`,
        );
      }
      if (length < FRAME_HEADER_BYTES) throw malformed(`frame length ${length} is shorter than its header`);
      const total = FRAME_LENGTH_BYTES + length;
      if (buf.length < total) {
        if (this.budget && !this.budget.reserve(total)) {
          throw kmsError('KMS_UNAVAILABLE', 'the daemon holds too many unfinished frames; retry later');
        }
        this.partial = Buffer.allocUnsafe(total);
        buf.copy(this.partial, 0);
        this.filled = buf.length;
        return;
      }
      const frame = buf.subarray(0, total);
      buf = buf.subarray(total);
      onFrame(this.frameOf(frame));
    }
    if (buf.length > 0) this.head = Buffer.from(buf);
  }

  /** Drops an unfinished frame and gives its bytes back to the budget (the connection closed). */
  dispose(): void {
    this.dropPartial();
    this.head = null;
  }

  private dropPartial(): void {
    if (this.partial === null) return;
    this.budget?.release(this.partial.length);
    this.partial = null;
  }

  private frameOf(whole: Buffer): Frame {
    // In bounds: callers refuse frames shorter than the length prefix plus the 5-byte header.
    return { id: whole.readUInt32BE(4), type: whole[8] as number, body: whole.subarray(9) };
  }
}

// ---------------------------------------------------------------------------------------------
// Requests and results: each op's body layout is declared in its file under src/ops/
// ---------------------------------------------------------------------------------------------

export function encodeRequest(id: number, req: KmsRequest): Buffer {
  const spec = opOf(req.op);
  const body = spec.binary.request;
  const w = new FrameWriter(id, spec.code, body.sizeHint?.(req) ?? 128);
  body.write(w, req);
  return w.finish();
}

/** Decodes a request body for a known op; throws MALFORMED_FRAME on any shape error. */
export function decodeRequest(op: KmsOp, body: Buffer): KmsRequest {
  const r = new BodyReader(body);
  const req = opOf(op).binary.request.read(r) as KmsRequest;
  r.end();
  return req;
}

/** Encodes the value the op's `run` returned as a RESULT frame. */
export function encodeResult(id: number, op: KmsOp, value: unknown): Buffer {
  const result = opOf(op).binary.result;
  const w = new FrameWriter(id, FRAME_RESULT, result.sizeHint?.(value) ?? 256);
  result.write(w, value);
  return w.finish();
}

/** Decodes a RESULT body for the op of the request it answers. */
export function decodeResult(op: KmsOp, body: Buffer): unknown {
  const r = new BodyReader(body);
  const value: unknown = opOf(op).binary.result.read(r);
  r.end();
  return value;
}

// ---------------------------------------------------------------------------------------------
// Auth and errors
// ---------------------------------------------------------------------------------------------

export function encodeAuth(id: number, token: string): Buffer {
  return new FrameWriter(id, FRAME_AUTH, token.length * 3).str(token).finish();
}

export function decodeAuth(body: Buffer): string {
  const r = new BodyReader(body);
  const token = r.str();
  r.end();
  return token;
}

export function encodeEmptyResult(id: number): Buffer {
  return new FrameWriter(id, FRAME_RESULT, 0).finish();
}

export function encodeError(id: number, code: ErrorCode, message: string): Buffer {
  return new FrameWriter(id, FRAME_ERROR, 64 + message.length * 3).str(code).str(message).finish();
}

export function decodeError(body: Buffer): CodedError {
  const r = new BodyReader(body);
  const code = r.str();
  const message = r.str();
  r.end();
  return fromWire(code, message);
}
