/**
 * The KMS over the daemon's TCP bridge: one connection, opened lazily, carrying many pipelined
 * requests whose answers are matched by id. Frames written in one tick share one write. With a
 * token, an AUTH frame goes first on every new connection (pipelined: we do not wait for it).
 *
 * When the connection drops, every request on it fails with KMS_UNAVAILABLE (the retry layer in
 * index.ts decides what to resend) and the next call connects again.
 */
import net, { type Socket } from 'node:net';
import tls from 'node:tls';
import { type CodedError, kmsError, toCodedError } from '../errors.js';
import type { KmsOp, KmsRequest } from '../ops/index.js';
import {
  decodeError,
  decodeResult,
  encodeAuth,
  encodeRequest,
  FRAME_ERROR,
  FRAME_RESULT,
  type Frame,
  FrameDecoder,
  MAX_OP_FRAME_BYTES,
} from '../wire/bridge-codec.js';
import { CorkedWriter } from '../wire/corked-writer.js';
import { formatHostPort } from '../wire/endpoint.js';
import { type RemoteTlsOptions, type RemoteTransport, socketError, unavailable } from './transport.js';

export interface TcpTransportOptions {
  host: string;
  port: number;
  /** TLS (node:tls) when set, with the daemon's CA and our client certificate if any. */
  tlsOptions?: RemoteTlsOptions | undefined;
  token?: string | undefined;
  timeoutMs: number;
}

interface Pending {
  /** null for the AUTH frame. */
  op: KmsOp | null;
  resolve(value: unknown): void;
  reject(err: CodedError): void;
  /** performance.now() after which the request times out. */
  deadline: number;
  /** Called instead of `reject` when the deadline passes. */
  expire(): void;
}

/** One socket and the requests sent on it. */
class Connection {
  readonly pending = new Map<number, Pending>();
  private readonly writer: CorkedWriter;
  /** No answer is larger than the frame of the largest single call (MAX_OP_FRAME_BYTES). */
  private readonly decoder = new FrameDecoder(MAX_OP_FRAME_BYTES);
  connected = false;
  /** Frames queued until the socket connects. */
  private queued: Buffer[] | null = [];
  /** Set when the daemon answered with a connection-level error; pending requests get it. */
  private closeReason: CodedError | null = null;
  closed = false;
  /**
   * One timer per connection, not one per request: it fires at the oldest request's deadline.
   * Every request has the same timeout, so the pending map (in send order) is in deadline order.
   */
  private sweeper: NodeJS.Timeout | null = null;
  private readonly sweep = () => {
    this.sweeper = null;
    const now = performance.now();
    for (const [id, entry] of this.pending) {
      if (entry.deadline > now) {
        this.sweeper = setTimeout(this.sweep, Math.ceil(entry.deadline - now));
        return;
      }
      this.forget(id);
      entry.expire();
      if (this.closed) return;
    }
  };

  constructor(
    private readonly socket: Socket,
    private readonly where: string,
    private readonly onClosed: (conn: Connection) => void,
  ) {
    this.writer = new CorkedWriter(socket);
    socket.setNoDelay(true);
    socket.once(socket instanceof tls.TLSSocket ? 'secureConnect' : 'connect', () => {
      this.connected = true;
      const queued = this.queued ?? [];
      this.queued = null;
      for (const frame of queued) this.writer.write(frame);
    });
    socket.on('data', (chunk: Buffer) => {
      try {
        this.decoder.push(chunk, (frame) => this.onFrame(frame));
      } catch (err) {
        this.closeReason = toCodedError(err);
        socket.destroy();
      }
    });
    socket.on('error', (err) => {
      this.closeReason ??= socketError(err, this.where, this.connected);
    });
    socket.on('close', () => this.onClose());
  }

  send(id: number, frame: Buffer, entry: Pending, timeoutMs: number): void {
    if (this.pending.size === 0) this.socket.ref();
    this.pending.set(id, entry);
    this.sweeper ??= setTimeout(this.sweep, timeoutMs);
    if (this.queued) this.queued.push(frame);
    else this.writer.write(frame);
  }

  forget(id: number): void {
    this.pending.delete(id);
    if (this.pending.size === 0) {
      this.socket.unref();
      if (this.sweeper !== null) {
        clearTimeout(this.sweeper);
        this.sweeper = null;
      }
    }
  }

  private onFrame(frame: Frame): void {
    if (frame.type === FRAME_ERROR && frame.id === 0) {
      // The daemon rejected the connection itself (malformed frame, say) and is closing it.
      this.closeReason = decodeError(frame.body);
      return;
    }
    const entry = this.pending.get(frame.id);
    if (!entry) return;
    this.forget(frame.id);
    if (frame.type === FRAME_ERROR) {
      const err = decodeError(frame.body);
      // A refused AUTH closes the connection: everything queued behind it fails the same way.
      if (entry.op === null) this.closeReason = err;
      entry.reject(err);
    } else if (frame.type === FRAME_RESULT && entry.op !== null) {
      try {
        entry.resolve(decodeResult(entry.op, frame.body));
      } catch (err) {
        entry.reject(toCodedError(err));
      }
    } else if (entry.op === null) {
      entry.resolve(undefined);
    } else {
      entry.reject(kmsError('INTERNAL', `unexpected frame type ${frame.type} from the KMS daemon`));
    }
  }

  private onClose(): void {
    this.closed = true;
    const reason = this.closeReason;
    if (this.sweeper !== null) clearTimeout(this.sweeper);
    this.sweeper = null;
    for (const [id, entry] of this.pending) {
      this.pending.delete(id);
      entry.reject(
        reason ?? unavailable(`connection to the KMS daemon at ${this.where} closed`, this.connected),
      );
    }
    this.onClosed(this);
  }

  destroy(): void {
    this.socket.destroy();
  }

  end(): void {
    this.writer.flushNow();
    this.socket.end();
    this.socket.destroySoon();
  }
}

export class TcpTransport implements RemoteTransport {
  readonly maxBatchBytes = 4 * 1024 * 1024;
  readonly coalesce = true;
  private conn: Connection | null = null;
  private nextId = 1;
  private readonly where: string;

  constructor(private readonly opts: TcpTransportOptions) {
    this.where = formatHostPort(opts.host, opts.port);
  }

  private newId(): number {
    const id = this.nextId;
    // Ids wrap within u32; 0 is reserved for connection-level errors.
    this.nextId = id >= 0xffffffff ? 1 : id + 1;
    return id;
  }

  private connection(): Connection {
    if (this.conn && !this.conn.closed) return this.conn;
    const { host, port, tlsOptions } = this.opts;
    const socket = tlsOptions
      ? tls.connect({ host, port, ...tlsOptions, ...(net.isIP(host) ? {} : { servername: host }) })
      : net.connect({ host, port });
    const conn = new Connection(socket, this.where, (c) => {
      if (this.conn === c) this.conn = null;
    });
    this.conn = conn;
    if (this.opts.token !== undefined) {
      const id = this.newId();
      conn.send(
        id,
        encodeAuth(id, this.opts.token),
        this.entry(
          conn,
          null,
          () => {},
          () => {},
        ),
        this.opts.timeoutMs,
      );
    }
    return conn;
  }

  private entry(
    conn: Connection,
    op: KmsOp | null,
    resolve: (v: unknown) => void,
    reject: (e: CodedError) => void,
  ): Pending {
    const expire = () => {
      if (!conn.connected) {
        reject(
          unavailable(
            `could not connect to the KMS daemon at ${this.where} in ${this.opts.timeoutMs} ms`,
            false,
          ),
        );
        conn.destroy();
        return;
      }
      reject(
        kmsError('TIMEOUT', `KMS daemon at ${this.where} did not answer within ${this.opts.timeoutMs} ms`),
      );
    };
    return { op, resolve, reject, deadline: performance.now() + this.opts.timeoutMs, expire };
  }

  call(req: KmsRequest): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const conn = this.connection();
      const id = this.newId();
      conn.send(id, encodeRequest(id, req), this.entry(conn, req.op, resolve, reject), this.opts.timeoutMs);
    });
  }

  async close(): Promise<void> {
    this.conn?.end();
    this.conn = null;
  }
}
