/**
 * createRemoteKms(): the Kms interface over the progressdb-kms daemon, by HTTP or by the TCP
 * bridge, so callers cannot tell it from the embedded createKms().
 *
 * Every method becomes one typed request (src/ops/) handed to a transport. This layer adds
 * what both transports share: retries (only for idempotent operations, or when the request
 * surely never left), batch splitting, single-item calls as batches of one, and rotateKek() as
 * "start, then poll until completed". The CallContext argument is not sent: the daemon records
 * the caller it authenticated (token name or certificate subject), which a client cannot forge.
 */

import type {
  CallContext,
  DecryptItem,
  DekInfo,
  DestroyResult,
  EncryptItem,
  EncryptResult,
  ItemResult,
  Kms,
  KmsHealth,
  RotationStatus,
} from '../api/index.js';
import { kmsError, toCodedError } from '../errors.js';
import { checkKeepFromVersion } from '../kms/dek-versions.js';
import { checkDataArgs, checkId } from '../kms/validate-args.js';
import type { KmsRequest } from '../ops/index.js';
import { CLIENT_SCHEMES, DEFAULT_HTTP_PORT, formatHostPort, parseEndpoint } from '../wire/endpoint.js';
import { HttpTransport } from './http-transport.js';
import { type Replica, ReplicaSet } from './replica-set.js';
import { TcpTransport } from './tcp-transport.js';
import { mayRepeat, type RemoteTlsOptions, type RemoteTransport } from './transport.js';

export type { RemoteTlsOptions };

export interface RemoteKmsOptions {
  /**
   * `host:port`, `http(s)://host:port`, `tcp://host:port` (selects the TCP bridge) or
   * `tls://host:port` (the TCP bridge over TLS, as the daemon announces a TLS bridge). A
   * comma-separated list names the replicas of one KMS cluster, like `endpoints`.
   */
  endpoint?: string;
  /**
   * The replicas of one KMS cluster: calls are spread over them, a replica that fails is left out
   * until its health probe answers, and what is safe to repeat is repeated on another replica.
   * All must use the same transport.
   */
  endpoints?: readonly string[];
  /** Overrides what the endpoint's scheme implies. Default: 'http' (or 'tcp' for tcp:// and tls://). */
  transport?: 'http' | 'tcp';
  /**
   * TLS to the daemon: its CA (default: the system store), and our certificate and key for mutual
   * TLS. Given, it turns TLS on for any endpoint; https:// and tls:// turn it on without it.
   */
  tls?: RemoteTlsOptions;
  /** Bearer token (HTTP) or AUTH frame token (bridge). */
  token?: string;
  /** Per attempt. Default 10000. */
  timeoutMs?: number;
  /** Extra attempts after a failure that is safe to retry. Default 2. */
  retries?: number;
}

/** Most items per batch request; the daemon's default limit. */
const MAX_BATCH_ITEMS = 1024;
/**
 * Single calls coalesced into one request: at most this many items and bytes, well inside the
 * daemon's default limits (1024 items, frames of one call on the largest input). A daemon configured lower answers
 * PAYLOAD_TOO_LARGE before running anything; the items are then resent one by one and this
 * client stops coalescing. 64 items is one worker task at the daemon's default: a request is
 * answered only when all its items are done, so many callers are better served by several
 * task-sized requests, answered as each finishes, than by one big one (1.3x over 256 with 256
 * callers on one connection).
 */
const COALESCE_MAX_ITEMS = 64;
const COALESCE_MAX_BYTES = 256 * 1024;

type ItemOp = 'encrypt' | 'decrypt';
/** The batchable ops: encrypt, decrypt, reencrypt_batch. */
type BatchOpName = Extract<KmsRequest, { items: unknown }>['op'];

interface Waiting {
  item: EncryptItem | DecryptItem;
  resolve(value: unknown): void;
  reject(err: unknown): void;
}

/** Single calls of one op waiting for the end of the tick. */
interface Coalescer {
  waiting: Waiting[];
  bytes: number;
  flush: () => void;
}
const ROTATION_POLL_MIN_MS = 50;
const ROTATION_POLL_MAX_MS = 1000;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Splits a batch so no request exceeds the item count or the byte budget. */
function chunk<T>(items: readonly T[], sizeOf: (item: T) => number, maxBytes: number): T[][] {
  const chunks: T[][] = [];
  let current: T[] = [];
  let bytes = 0;
  for (const item of items) {
    const n = sizeOf(item);
    if (current.length > 0 && (current.length >= MAX_BATCH_ITEMS || bytes + n > maxBytes)) {
      chunks.push(current);
      current = [];
      bytes = 0;
    }
    current.push(item);
    bytes += n;
  }
  if (current.length > 0) chunks.push(current);
  return chunks;
}

function single<T>(results: ItemResult<T>[]): T {
  const only = results[0];
  if (!only) throw kmsError('INTERNAL', 'the KMS daemon answered an empty batch');
  if (!only.ok) throw only.error;
  return only.value;
}

/** Wire bytes of one item, roughly; malformed items count as small (the encoder rejects them). */
function itemBytes(op: ItemOp, item: EncryptItem | DecryptItem): number {
  const data = op === 'encrypt' ? (item as EncryptItem).plaintext : (item as DecryptItem).ciphertext;
  const keyId = typeof item.keyId === 'string' ? item.keyId.length * 3 : 0;
  return (data?.byteLength ?? 0) + (item.aad?.byteLength ?? 0) + keyId + 12;
}

/**
 * Runs `send` once `check` passed; a failed check rejects with its own error (INVALID_INPUT,
 * PAYLOAD_TOO_LARGE) before anything is sent, as the embedded KMS would.
 */
function checked<T>(check: () => void, send: () => Promise<T>): Promise<T> {
  try {
    check();
  } catch (err) {
    return Promise.reject(toCodedError(err));
  }
  return send();
}

/** The item as sent: both wire formats take an absent AAD as undefined, the interface also null. */
function wireItem<I extends EncryptItem | DecryptItem>(item: I): I {
  return item.aad === null ? { ...item, aad: undefined } : item;
}

function ciphertextBytes(item: DecryptItem): number {
  return item.ciphertext.byteLength + (item.aad?.byteLength ?? 0);
}

/** After a coalesced request was refused as too large, single calls go alone for this long. */
const COALESCE_BACKOFF_MS = 60_000;

class RemoteKms implements Kms {
  private closed = false;
  private readonly coalesce: boolean;
  /** performance.now() until which coalescing is off (see COALESCE_BACKOFF_MS). */
  private coalesceOffUntil = 0;
  private readonly coalescers: Record<ItemOp, Coalescer>;

  constructor(
    private readonly transport: RemoteTransport,
    private readonly retries: number,
  ) {
    this.coalesce = transport.coalesce === true;
    const coalescer = (op: ItemOp): Coalescer => {
      const c: Coalescer = { waiting: [], bytes: 0, flush: () => this.flushSingles(op, c) };
      return c;
    };
    this.coalescers = { encrypt: coalescer('encrypt'), decrypt: coalescer('decrypt') };
  }

  /**
   * One single-item call. With a coalescing transport, the single calls made in one tick (many
   * concurrent callers) go out as one batch request, each caller getting its own item's result
   * or error: the same answers as separate requests, at a fraction of the per-request cost.
   */
  private one<R>(op: ItemOp, item: EncryptItem | DecryptItem): Promise<R> {
    if (!this.coalesce || (this.coalesceOffUntil !== 0 && performance.now() < this.coalesceOffUntil)) {
      return this.batch<EncryptItem | DecryptItem, R>(op, [item], () => 0).then(single);
    }
    const c = this.coalescers[op];
    const bytes = itemBytes(op, item);
    if (c.waiting.length > 0 && c.bytes + bytes > COALESCE_MAX_BYTES) c.flush();
    return new Promise<R>((resolve, reject) => {
      c.waiting.push({ item, resolve: resolve as (v: unknown) => void, reject });
      c.bytes += bytes;
      if (c.waiting.length === 1) process.nextTick(c.flush);
      else if (c.waiting.length >= COALESCE_MAX_ITEMS) c.flush();
    });
  }

  private flushSingles(op: ItemOp, c: Coalescer): void {
    const waiting = c.waiting;
    if (waiting.length === 0) return;
    c.waiting = [];
    c.bytes = 0;
    const items = waiting.map((w) => w.item);
    this.call<ItemResult<unknown>[]>({ op, items } as KmsRequest).then(
      (results) => {
        for (let i = 0; i < waiting.length; i++) {
          const r = results[i];
          const w = waiting[i] as Waiting;
          if (r === undefined) w.reject(kmsError('INTERNAL', 'the KMS daemon answered a short batch'));
          else if (r.ok) w.resolve(r.value);
          else w.reject(r.error);
        }
      },
      (thrown) => {
        const err = toCodedError(thrown);
        if (err.code === 'PAYLOAD_TOO_LARGE' && waiting.length > 1) {
          // Refused before anything ran (item or frame limit set below our batch): resend alone.
          this.coalesceOffUntil = performance.now() + COALESCE_BACKOFF_MS;
          for (const w of waiting) this.one(op, w.item).then(w.resolve, w.reject);
          return;
        }
        for (const w of waiting) w.reject(err);
      },
    );
  }

  private async call<T>(req: KmsRequest): Promise<T> {
    if (this.closed) throw kmsError('KMS_UNAVAILABLE', 'the remote KMS client is closed');
    for (let attempt = 0; ; attempt++) {
      try {
        return (await this.transport.call(req)) as T;
      } catch (thrown) {
        const err = toCodedError(thrown);
        if (attempt >= this.retries || this.closed || !mayRepeat(req.op, err)) throw err;
        // Short, jittered backoff: a restarting daemon gets a moment, a dead one fails fast.
        await sleep(Math.min(500, 25 * 2 ** attempt) * (0.5 + Math.random() / 2));
      }
    }
  }

  /**
   * A batch whose items are checked here first, as the embedded KMS checks each: a bad item gets
   * its own error result and is not sent; the others go to the daemon.
   */
  private async checkedBatch<I extends EncryptItem | DecryptItem, R>(
    op: BatchOpName,
    items: readonly I[],
    sizeOf: (item: I) => number,
  ): Promise<ItemResult<R>[]> {
    if (!Array.isArray(items)) throw kmsError('INVALID_INPUT', 'items must be an array');
    const encrypt = op === 'encrypt';
    let refused: (ItemResult<R> | undefined)[] | null = null;
    const valid: I[] = [];
    for (let i = 0; i < items.length; i++) {
      const item = items[i] as Partial<EncryptItem & DecryptItem> | null | undefined;
      try {
        checkDataArgs(encrypt, item?.keyId, encrypt ? item?.plaintext : item?.ciphertext, item?.aad);
        valid.push(wireItem(item as I));
      } catch (err) {
        refused ??= new Array(items.length);
        refused[i] = { ok: false, error: toCodedError(err) };
      }
    }
    const answers = await this.batch<I, R>(op, valid, sizeOf);
    if (refused === null) return answers;
    let next = 0;
    // answers has one result per item not refused, in order.
    return Array.from(refused, (r) => r ?? (answers[next++] as ItemResult<R>));
  }

  private async batch<I, R>(
    op: BatchOpName,
    items: readonly I[],
    sizeOf: (item: I) => number,
  ): Promise<ItemResult<R>[]> {
    if (items.length === 0) return [];
    // One item (every single encrypt/decrypt) is one request: no splitting, no Promise.all.
    if (items.length === 1) return this.call<ItemResult<R>[]>({ op, items: items as I[] } as KmsRequest);
    const parts = chunk(items, sizeOf, this.transport.maxBatchBytes);
    const answers = await Promise.all(
      parts.map((part) => this.call<ItemResult<R>[]>({ op, items: part } as KmsRequest)),
    );
    return answers.length === 1 ? (answers[0] as ItemResult<R>[]) : answers.flat();
  }

  /** A call naming one key: the id is checked first, as the embedded KMS checks it. */
  private keyCall<T>(keyId: string, req: KmsRequest): Promise<T> {
    return checked(
      () => checkId('key_id', keyId),
      () => this.call<T>(req),
    );
  }

  createDekForThread(threadId: string, _ctx?: CallContext): Promise<DekInfo> {
    return checked(
      () => checkId('thread_id', threadId),
      () => this.call({ op: 'create_dek_for_thread', threadId }),
    );
  }

  getWrappedDek(keyId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.keyCall(keyId, { op: 'get_wrapped', keyId });
  }

  encrypt(
    keyId: string,
    plaintext: Uint8Array,
    aad?: Uint8Array,
    _ctx?: CallContext,
  ): Promise<EncryptResult> {
    return checked(
      () => checkDataArgs(true, keyId, plaintext, aad),
      () => this.one('encrypt', wireItem({ keyId, plaintext, aad })),
    );
  }

  decrypt(keyId: string, ciphertext: Uint8Array, aad?: Uint8Array, _ctx?: CallContext): Promise<Buffer> {
    return checked(
      () => checkDataArgs(false, keyId, ciphertext, aad),
      () => this.one('decrypt', wireItem({ keyId, ciphertext, aad })),
    );
  }

  encryptBatch(items: readonly EncryptItem[], _ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.checkedBatch('encrypt', items, (it) => it.plaintext.byteLength + (it.aad?.byteLength ?? 0));
  }

  decryptBatch(items: readonly DecryptItem[], _ctx?: CallContext): Promise<ItemResult<Buffer>[]> {
    return this.checkedBatch('decrypt', items, ciphertextBytes);
  }

  reencryptBatch(items: readonly DecryptItem[], _ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.checkedBatch('reencrypt_batch', items, ciphertextBytes);
  }

  reencrypt(
    keyId: string,
    ciphertext: Uint8Array,
    aad?: Uint8Array,
    _ctx?: CallContext,
  ): Promise<EncryptResult> {
    return checked(
      () => checkDataArgs(false, keyId, ciphertext, aad),
      () => this.call({ op: 'reencrypt', keyId, ciphertext, aad: aad ?? undefined }),
    );
  }

  rewrapDek(keyId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.keyCall(keyId, { op: 'rewrap', keyId });
  }

  rotateDek(keyId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.keyCall(keyId, { op: 'rotate_dek', keyId });
  }

  destroyDekVersionsBefore(
    keyId: string,
    keepFromVersion: number,
    _ctx?: CallContext,
  ): Promise<DestroyResult> {
    // Checked in the embedded KMS's order: the version first, then the id.
    return checked(
      () => {
        checkKeepFromVersion(keepFromVersion);
        checkId('key_id', keyId);
      },
      () => this.call({ op: 'destroy_dek_versions_before', keyId, keepFromVersion }),
    );
  }

  destroyDek(keyId: string, _ctx?: CallContext): Promise<DestroyResult> {
    return this.keyCall(keyId, { op: 'destroy_dek', keyId });
  }

  cancelDeletion(keyId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.keyCall(keyId, { op: 'cancel_deletion', keyId });
  }

  startKekRotation(_ctx?: CallContext): Promise<RotationStatus> {
    return this.call({ op: 'rotate_kek' });
  }

  /**
   * Starts (or joins) a rotation, then polls its status until it has completed. The daemon reports
   * "running" until the rotation it started or joined has finished, so "completed" is final.
   */
  async rotateKek(ctx?: CallContext): Promise<RotationStatus> {
    let status = await this.startKekRotation(ctx);
    for (let delay = ROTATION_POLL_MIN_MS; status.state !== 'completed'; ) {
      await sleep(delay);
      delay = Math.min(ROTATION_POLL_MAX_MS, delay * 2);
      status = await this.rotationStatus();
    }
    return status;
  }

  rotationStatus(): Promise<RotationStatus> {
    return this.call({ op: 'rotation_status' });
  }

  health(): Promise<KmsHealth> {
    return this.call({ op: 'health' });
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.transport.close();
  }
}

/** The endpoints named by `endpoint` (comma-separated) and `endpoints`, trimmed, in order. */
function endpointList(opts: RemoteKmsOptions): string[] {
  const given = [...(opts.endpoint?.split(',') ?? []), ...(opts.endpoints ?? [])];
  const list = given.map((e) => (typeof e === 'string' ? e.trim() : e)).filter((e) => e !== '');
  if (list.length === 0) throw kmsError('CONFIG_INVALID', 'give the KMS endpoint (endpoint or endpoints)');
  for (const e of list) {
    if (typeof e !== 'string') throw kmsError('CONFIG_INVALID', 'endpoints must be strings');
  }
  if (new Set(list).size !== list.length) {
    throw kmsError('CONFIG_INVALID', `endpoints name a replica twice: ${list.join(', ')}`);
  }
  return list;
}

function transportFor(
  endpoint: string,
  opts: RemoteKmsOptions,
  timeoutMs: number,
): Replica & { kind: string } {
  const ep = parseEndpoint(endpoint, DEFAULT_HTTP_PORT, CLIENT_SCHEMES);
  const bridgeScheme = ep.scheme === 'tcp' || ep.scheme === 'tls';
  const kind = opts.transport ?? (bridgeScheme ? 'tcp' : 'http');
  if (ep.port === 0)
    throw kmsError('CONFIG_INVALID', `endpoint "${endpoint}": port 0 cannot be connected to`);
  if (kind === 'http' && bridgeScheme) {
    throw kmsError('CONFIG_INVALID', `a ${ep.scheme}:// endpoint cannot use the http transport`);
  }
  const common = { host: ep.host, port: ep.port, tlsOptions: opts.tls, token: opts.token, timeoutMs };
  const transport: RemoteTransport =
    kind === 'tcp'
      ? new TcpTransport({ ...common, tlsOptions: ep.scheme === 'tls' ? (opts.tls ?? {}) : opts.tls })
      : new HttpTransport({ ...common, secure: ep.scheme === 'https' || opts.tls !== undefined });
  return { where: formatHostPort(ep.host, ep.port), transport, kind };
}

/**
 * The same Kms interface as createKms(), served by a progressdb-kms daemon, or by the replicas of
 * a KMS cluster when several endpoints are given. Connects lazily.
 */
export function createRemoteKms(opts: RemoteKmsOptions): Kms {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const retries = opts.retries ?? 2;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1)
    throw kmsError('CONFIG_INVALID', 'timeoutMs must be >= 1');
  if (!Number.isInteger(retries) || retries < 0 || retries > 10) {
    throw kmsError('CONFIG_INVALID', 'retries must be an integer from 0 to 10');
  }
  const replicas = endpointList(opts).map((e) => transportFor(e, opts, timeoutMs));
  if (new Set(replicas.map((r) => r.kind)).size > 1) {
    for (const r of replicas) void r.transport.close();
    throw kmsError('CONFIG_INVALID', 'all endpoints must use the same transport (http or the TCP bridge)');
  }
  const only = replicas.length === 1 ? replicas[0] : undefined;
  return new RemoteKms(only ? only.transport : new ReplicaSet(replicas), retries);
}
