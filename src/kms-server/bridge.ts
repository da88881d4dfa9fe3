/**
 * The TCP bridge listener: the KMS operations (src/ops/) framed on a socket, optionally
 * over TLS. Framing is in wire/bridge-codec.ts.
 *
 * Per connection: frames are decoded as they stream in; each request is dispatched at once
 * (pipelining) and answered when done, possibly out of order, matched by id. Answers produced in
 * one tick go out in one write (cork/uncork). Reading pauses while too many requests are in
 * flight or the socket is not draining, so a fast writer cannot grow our memory without bound.
 *
 * Auth: with tokens configured, the first frame must be AUTH (a request first is answered
 * UNAUTHENTICATED and the connection closed; a wrong token FORBIDDEN and closed). The caller is
 * then fixed for the connection, like a client certificate is. Until then the connection costs
 * little: it may send one frame of at most PRE_AUTH_FRAME_BYTES (a larger length prefix is
 * refused before any of it is buffered), and must send it within `auth_timeout_ms`. A caller
 * known at accept time (client certificate, allowed network, no tokens) gets the normal limits.
 *
 * Memory: a frame that spans chunks is buffered only while the listener-wide FrameBudget
 * (`max_buffered_frame_bytes`) has room for all of it; otherwise that connection gets an ERROR
 * (KMS_UNAVAILABLE, which clients retry) and is closed. Closing rather than pausing: a paused
 * connection would keep its slot and its partial frame, and connections waiting on each other's
 * budget could all stall.
 *
 * Idle: a connection with nothing in flight and no bytes for `idle_timeout_ms` is closed (plain
 * end, no ERROR: the client simply reconnects on its next call); the same timer ends a frame that
 * stalls midway.
 *
 * A malformed, oversized or truncated frame is answered with an ERROR frame (id 0 when the
 * request id could not be read) and closes that connection only. An unknown op code, or a batch
 * over the item limit, is answered with an ERROR for that id and the connection stays open.
 */
import net, { type AddressInfo, type Server, type Socket } from 'node:net';
import tls from 'node:tls';
import type { CallContext, ItemResult, Kms } from '../api/index.js';
import type { DaemonLimits } from '../config/daemon.js';
import { type CodedError, kmsError, toCodedError } from '../errors.js';
import type { Logger } from '../log.js';
import { type KmsOp, type KmsRequest, labelOf, opOf } from '../ops/index.js';
import type { AnyOp } from '../ops/op.js';
import {
  decodeAuth,
  decodeRequest,
  encodeEmptyResult,
  encodeError,
  encodeResult,
  FRAME_AUTH,
  type Frame,
  FrameBudget,
  FrameDecoder,
  opOfCode,
} from '../wire/bridge-codec.js';
import { CorkedWriter } from '../wire/corked-writer.js';
import type { Authenticator } from './auth.js';
import { PerAddressLimit } from './connection-limits.js';
import type { DaemonMetrics } from './metrics.js';

/** Requests in flight per connection before we stop reading from it. */
const MAX_IN_FLIGHT = 4096;
/**
 * Largest frame before AUTH: header, u32 length and a token of at most MAX_TOKEN_BYTES (1 KiB,
 * config.ts), with room to spare.
 */
export const PRE_AUTH_FRAME_BYTES = 4096;
/** A peer that never reads our last frame must not hold the socket open. */
const CLOSE_GRACE_MS = 5_000;

type BatchSpec = Extract<AnyOp, { batch: true }>;
type ItemRequest = Extract<KmsRequest, { items: unknown }>;

/** Consecutive frames of one batchable op (encrypt, decrypt) in one chunk, run as one KMS call. */
interface Group {
  spec: BatchSpec;
  ids: number[];
  requests: ItemRequest[];
  items: number;
}

export interface BridgeDeps {
  kms: Kms;
  auth: Authenticator;
  metrics: DaemonMetrics;
  limits: DaemonLimits;
  logger: Logger;
  /**
   * Most items handed to the KMS in one merged call (frames of one chunk, see BridgeConnection):
   * the KMS's ops per worker task. A merged call is answered only when all its items are done, so
   * merging several tasks' worth made a busy connection run in lockstep (workers idle while one
   * big answer travelled and the next big request came): 76-79k ops/s at 1024 against 86-105k at 64.
   */
  mergeItems: number;
}

class BridgeConnection {
  private readonly decoder: FrameDecoder;
  private caller: CallContext | null = null;
  private inFlight = 0;
  private readonly writer: CorkedWriter;
  private paused = { backlog: false, drain: false };
  /** No more frames are processed: failed, or the daemon is draining. */
  private stopped = false;
  /** Item frames decoded from the current chunk, not yet handed to the KMS. */
  private group: Group | null = null;
  /** Runs until the AUTH frame arrives (tokens required, caller not known at accept). */
  private authTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly socket: Socket,
    private readonly deps: BridgeDeps,
    budget: FrameBudget,
    onClosed: (conn: BridgeConnection) => void,
  ) {
    this.decoder = new FrameDecoder(deps.limits.maxFrameBytes, budget);
    this.writer = new CorkedWriter(socket, 'immediate');
    socket.setNoDelay(true);
    socket.setTimeout(deps.limits.idleTimeoutMs);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => this.onEnd());
    socket.on('timeout', () => this.onTimeout());
    socket.on('drain', () => {
      this.paused.drain = false;
      this.updateFlow();
    });
    // A peer that resets is not our error; 'close' follows and cleans up.
    socket.on('error', () => {});
    socket.on('close', () => {
      if (this.authTimer !== null) clearTimeout(this.authTimer);
      this.decoder.dispose();
      onClosed(this);
    });
    try {
      this.caller = deps.auth.callerAtAccept(socket);
    } catch (err) {
      this.fail(0, toCodedError(err));
      return;
    }
    if (this.caller === null) {
      this.decoder.maxFrameBytes = PRE_AUTH_FRAME_BYTES;
      const ms = deps.limits.authTimeoutMs;
      this.authTimer = setTimeout(() => {
        deps.metrics.connectionClosed('bridge', 'auth_timeout');
        this.fail(0, kmsError('UNAUTHENTICATED', `no AUTH frame within ${ms} ms`));
      }, ms);
    }
  }

  private onTimeout(): void {
    if (this.stopped) return;
    if (this.decoder.midFrame) {
      this.fail(0, kmsError('MALFORMED_FRAME', 'frame stalled (truncated)'));
    } else if (this.inFlight === 0 && this.group === null) {
      this.deps.metrics.connectionClosed('bridge', 'idle');
      this.drain();
    }
    // Requests in flight: their answers are activity, which re-arms the timer.
  }

  private onData(chunk: Buffer): void {
    if (this.stopped) return;
    try {
      this.decoder.push(chunk, this.onFrameBound);
    } catch (err) {
      const coded = toCodedError(err);
      if (coded.code === 'KMS_UNAVAILABLE') this.deps.metrics.connectionClosed('bridge', 'frame_budget');
      this.fail(0, coded);
      return;
    }
    this.runGroup();
  }

  private readonly onFrameBound = (frame: Frame) => this.onFrame(frame);

  private onEnd(): void {
    if (this.stopped) return;
    if (this.decoder.midFrame) {
      this.fail(0, kmsError('MALFORMED_FRAME', 'connection ended inside a frame (truncated)'));
      return;
    }
    // The client half-closed: answer what is in flight, then close our side.
    this.stopped = true;
    this.endWhenIdle();
  }

  private onFrame(frame: Frame): void {
    if (this.stopped) return;
    if (frame.type === FRAME_AUTH) {
      this.onAuth(frame);
      return;
    }
    if (this.caller === null) {
      this.fail(frame.id, kmsError('UNAUTHENTICATED', 'send an AUTH frame first'));
      return;
    }
    const op = opOfCode(frame.type);
    if (op === undefined) {
      this.send(encodeError(frame.id, 'UNSUPPORTED_OPERATION', `unknown frame type ${frame.type}`));
      return;
    }
    let req: KmsRequest;
    try {
      req = decodeRequest(op, frame.body);
    } catch (err) {
      this.fail(frame.id, toCodedError(err));
      return;
    }
    const spec = opOf(op);
    if (spec.batch) {
      const items = (req as ItemRequest).items;
      if (items.length > this.deps.limits.maxBatchItems) {
        const max = this.deps.limits.maxBatchItems;
        this.answerError(
          frame.id,
          labelOf(spec),
          performance.now(),
          kmsError('PAYLOAD_TOO_LARGE', `batch exceeds ${max} items`),
        );
        return;
      }
      this.addToGroup(frame.id, spec, req as ItemRequest);
      return;
    }
    // Requests start in the order they arrived: item frames queued before this one go first.
    this.runGroup();
    this.run(frame.id, spec, req);
  }

  /**
   * Queues a frame of a batchable op. The frames of one chunk go to the KMS as one batch call (one
   * promise, one pass through the KMS's batch path) instead of one call each; every frame is
   * still answered, counted and timed on its own, with its own slice of the results.
   */
  private addToGroup(id: number, spec: BatchSpec, req: ItemRequest): void {
    const g = this.group;
    if (g !== null && (g.spec !== spec || g.items + req.items.length > this.deps.mergeItems)) this.runGroup();
    if (this.group === null) this.group = { spec, ids: [], requests: [], items: 0 };
    this.group.ids.push(id);
    this.group.requests.push(req);
    this.group.items += req.items.length;
  }

  private runGroup(): void {
    const g = this.group;
    if (g === null) return;
    this.group = null;
    if (g.ids.length === 1) {
      // biome-ignore lint/style/noNonNullAssertion: a group holds at least one request
      this.run(g.ids[0]!, g.spec, g.requests[0]!);
      return;
    }
    const startedAt = performance.now();
    const n = g.ids.length;
    const op = g.spec.name as KmsOp;
    const label = labelOf(g.spec);
    this.inFlight += n;
    this.updateFlow();
    const items: unknown[] = [];
    for (const r of g.requests) for (const item of r.items) items.push(item);
    // biome-ignore lint/style/noNonNullAssertion: ops run only after the AUTH step set the caller
    const call: Promise<ItemResult<unknown>[]> = g.spec.run(this.deps.kms, { items }, this.caller!);
    call.then(
      (results) => {
        let at = 0;
        for (let i = 0; i < n; i++) {
          // biome-ignore lint/style/noNonNullAssertion: i < g.requests.length
          const count = g.requests[i]!.items.length;
          const mine = results.slice(at, at + count);
          at += count;
          this.countItemErrors(mine);
          this.deps.metrics.observe(label, 'bridge', startedAt);
          // biome-ignore lint/style/noNonNullAssertion: i < g.requests.length (one id per request)
          this.send(encodeResult(g.ids[i]!, op, mine));
        }
        this.settled(n);
      },
      (thrown) => {
        const err = toCodedError(thrown);
        for (const id of g.ids) this.answerError(id, label, startedAt, err);
        this.settled(n);
      },
    );
  }

  private onAuth(frame: Frame): void {
    try {
      this.caller = this.deps.auth.authenticate(decodeAuth(frame.body), this.socket);
      this.decoder.maxFrameBytes = this.deps.limits.maxFrameBytes;
      if (this.authTimer !== null) clearTimeout(this.authTimer);
      this.authTimer = null;
      this.send(encodeEmptyResult(frame.id));
    } catch (err) {
      this.fail(frame.id, toCodedError(err));
    }
  }

  private run(id: number, spec: AnyOp, req: KmsRequest): void {
    const startedAt = performance.now();
    const op = spec.name as KmsOp;
    const label = labelOf(spec);
    this.inFlight++;
    this.updateFlow();
    // biome-ignore lint/style/noNonNullAssertion: ops run only after the AUTH step set the caller
    spec.run(this.deps.kms, req, this.caller!).then(
      (value: unknown) => {
        if (spec.batch) this.countItemErrors(value as ItemResult<unknown>[]);
        this.deps.metrics.observe(label, 'bridge', startedAt);
        this.send(encodeResult(id, op, value));
        this.settled();
      },
      (thrown) => {
        this.answerError(id, label, startedAt, toCodedError(thrown));
        this.settled();
      },
    );
  }

  private answerError(id: number, label: string, startedAt: number, err: CodedError): void {
    if (err.code === 'INTERNAL')
      this.deps.logger.error({ op: label, err: err.cause ?? err }, 'bridge request failed');
    this.deps.metrics.observe(label, 'bridge', startedAt, err);
    this.send(encodeError(id, err.code, err.message));
  }

  private countItemErrors(results: ItemResult<unknown>[]): void {
    for (const r of results) if (!r.ok) this.deps.metrics.itemError(r.error.code, 'bridge');
  }

  private settled(n = 1): void {
    this.inFlight -= n;
    this.updateFlow();
    if (this.stopped) this.endWhenIdle();
  }

  private updateFlow(): void {
    this.paused.backlog = this.inFlight >= MAX_IN_FLIGHT;
    if (this.stopped || this.paused.backlog || this.paused.drain) this.socket.pause();
    else this.socket.resume();
  }

  private send(frame: Buffer): void {
    if (this.socket.writableEnded || this.socket.destroyed) return;
    if (!this.writer.write(frame)) {
      this.paused.drain = true;
      this.updateFlow();
    }
  }

  /** Answers with an error frame and closes this connection (only). */
  private fail(id: number, err: CodedError): void {
    if (this.stopped && this.socket.writableEnded) return;
    // Frames that arrived before the failing one were accepted: they run, as they always did.
    this.runGroup();
    this.stopped = true;
    this.socket.pause();
    this.send(encodeError(id, err.code, err.message));
    this.writer.flushNow();
    this.endSocket();
  }

  private endSocket(): void {
    this.socket.end();
    setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS).unref();
  }

  private endWhenIdle(): void {
    if (this.inFlight === 0 && !this.socket.writableEnded) {
      this.writer.flushNow();
      this.endSocket();
    }
  }

  /** Stops reading new frames; the connection ends once its in-flight requests are answered. */
  drain(): void {
    this.stopped = true;
    this.socket.pause();
    this.endWhenIdle();
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export class BridgeServer {
  private readonly server: Server;
  private readonly connections = new Set<BridgeConnection>();
  private readonly budget: FrameBudget;

  constructor(deps: BridgeDeps) {
    const tlsOptions = deps.auth.serverTlsOptions();
    const perAddress = new PerAddressLimit(deps.limits.maxConnectionsPerAddress);
    this.budget = new FrameBudget(deps.limits.maxBufferedFrameBytes);
    deps.metrics.bufferedFrameBytes = () => this.budget.used;
    const onConnection = (socket: Socket) => {
      if (socket.destroyed) return; // refused by the per-address limit below
      deps.metrics.bridgeConnectionOpened();
      this.connections.add(
        new BridgeConnection(socket, deps, this.budget, (conn) => {
          this.connections.delete(conn);
          deps.metrics.bridgeConnectionClosed();
        }),
      );
    };
    this.server = tlsOptions
      ? tls.createServer({ ...tlsOptions, allowHalfOpen: true }, onConnection)
      : net.createServer({ allowHalfOpen: true }, onConnection);
    this.server.maxConnections = deps.limits.maxConnections;
    // On the raw socket, before a TLS handshake: an address at its limit costs no handshake either.
    this.server.prependListener('connection', (socket: Socket) => {
      if (perAddress.admit(socket)) return;
      deps.metrics.connectionClosed('bridge', 'per_address_limit');
      socket.destroy();
    });
    // Failed handshakes (no or wrong client certificate) are the peer's problem: drop quietly.
    this.server.on('tlsClientError', (err: Error) =>
      deps.logger.debug({ err: err.message }, 'bridge TLS handshake failed'),
    );
  }

  listen(host: string, port: number): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve(this.server.address() as AddressInfo);
      });
    });
  }

  /** Stops accepting, lets in-flight requests finish, and force-closes what is left at the deadline. */
  async close(deadlineMs: number): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const conn of this.connections) conn.drain();
    const timer = setTimeout(() => {
      for (const conn of this.connections) conn.destroy();
    }, deadlineMs);
    await closed;
    clearTimeout(timer);
  }
}
