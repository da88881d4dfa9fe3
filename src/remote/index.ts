/**
 * createRemoteKms(): the Kms interface over the progressdb-kms daemon, by HTTP or by the TCP
 * bridge, so callers cannot tell it from the embedded createKms().
 *
 * Every method becomes one typed request (protocol.ts) handed to a transport. This layer adds
 * what both transports share: retries (only for idempotent operations, or when the request
 * surely never left), batch splitting, single-item calls as batches of one, and rotateKek() as
 * "start, then poll until completed". The CallContext argument is not sent: the daemon records
 * the caller it authenticated (token name or certificate subject), which a client cannot forge.
 */
import { type CodedError, kmsError, toCodedError } from '../errors.js';
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
  KmsOp,
  KmsRequest,
  RotationStatus,
} from '../protocol.js';
import { parseEndpoint } from '../wire/endpoint.js';
import { HttpTransport } from './http-transport.js';
import { TcpTransport } from './tcp-transport.js';
import { type RemoteTlsOptions, type RemoteTransport, surelyNotSent } from './transport.js';

export type { RemoteTlsOptions };

export interface RemoteKmsOptions {
  /** `host:port`, `http(s)://host:port`, or `tcp://host:port` (selects the TCP bridge). */
  endpoint: string;
  /** Overrides what the endpoint's scheme implies. Default: 'http' (or 'tcp' for tcp://). */
  transport?: 'http' | 'tcp';
  /** TLS to the daemon: its CA, and our certificate and key for mutual TLS. */
  tls?: RemoteTlsOptions;
  /** Bearer token (HTTP) or AUTH frame token (bridge). */
  token?: string;
  /** Per attempt. Default 10000. */
  timeoutMs?: number;
  /** Extra attempts after a failure that is safe to retry. Default 2. */
  retries?: number;
}

/** Operations whose repetition has no further effect: safe to retry after an unknown outcome. */
const IDEMPOTENT: ReadonlySet<KmsOp> = new Set<KmsOp>([
  'get_wrapped',
  'decrypt',
  'create_dek_for_thread',
  'rotation_status',
  'health',
  'rewrap',
]);

/** Most items per batch request; the daemon's default limit. */
const MAX_BATCH_ITEMS = 1024;
const ROTATION_POLL_MIN_MS = 50;
const ROTATION_POLL_MAX_MS = 1000;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function isRetryable(op: KmsOp, err: CodedError): boolean {
  if (surelyNotSent(err)) return true;
  if (!IDEMPOTENT.has(op)) return false;
  return err.code === 'KMS_UNAVAILABLE' || err.code === 'NOT_READY' || err.code === 'TIMEOUT';
}

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

class RemoteKms implements Kms {
  private closed = false;

  constructor(
    private readonly transport: RemoteTransport,
    private readonly retries: number,
  ) {}

  private async call<T>(req: KmsRequest): Promise<T> {
    if (this.closed) throw kmsError('KMS_UNAVAILABLE', 'the remote KMS client is closed');
    for (let attempt = 0; ; attempt++) {
      try {
        return (await this.transport.call(req)) as T;
      } catch (thrown) {
        const err = toCodedError(thrown);
        if (attempt >= this.retries || this.closed || !isRetryable(req.op, err)) throw err;
        // Short, jittered backoff: a restarting daemon gets a moment, a dead one fails fast.
        await sleep(Math.min(500, 25 * 2 ** attempt) * (0.5 + Math.random() / 2));
      }
    }
  }

  private async batch<I, R>(
    op: 'encrypt' | 'decrypt',
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
    return answers.length === 1 ? answers[0]! : answers.flat();
  }

  createDekForThread(threadId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.call({ op: 'create_dek_for_thread', threadId });
  }

  getWrappedDek(keyId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.call({ op: 'get_wrapped', keyId });
  }

  async encrypt(
    keyId: string,
    plaintext: Uint8Array,
    aad?: Uint8Array,
    _ctx?: CallContext,
  ): Promise<EncryptResult> {
    return single(await this.encryptBatch([{ keyId, plaintext, aad }]));
  }

  async decrypt(
    keyId: string,
    ciphertext: Uint8Array,
    aad?: Uint8Array,
    _ctx?: CallContext,
  ): Promise<Buffer> {
    return single(await this.decryptBatch([{ keyId, ciphertext, aad }]));
  }

  encryptBatch(items: readonly EncryptItem[], _ctx?: CallContext): Promise<ItemResult<EncryptResult>[]> {
    return this.batch('encrypt', items, (it) => it.plaintext.byteLength + (it.aad?.byteLength ?? 0));
  }

  decryptBatch(items: readonly DecryptItem[], _ctx?: CallContext): Promise<ItemResult<Buffer>[]> {
    return this.batch('decrypt', items, (it) => it.ciphertext.byteLength + (it.aad?.byteLength ?? 0));
  }

  reencrypt(
    keyId: string,
    ciphertext: Uint8Array,
    aad?: Uint8Array,
    _ctx?: CallContext,
  ): Promise<EncryptResult> {
    return this.call({ op: 'reencrypt', keyId, ciphertext, aad });
  }

  rewrapDek(keyId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.call({ op: 'rewrap', keyId });
  }

  rotateDek(keyId: string, _ctx?: CallContext): Promise<DekInfo> {
    return this.call({ op: 'rotate_dek', keyId });
  }

  destroyDekVersionsBefore(
    keyId: string,
    keepFromVersion: number,
    _ctx?: CallContext,
  ): Promise<DestroyResult> {
    return this.call({ op: 'destroy_dek_versions_before', keyId, keepFromVersion });
  }

  destroyDek(keyId: string, _ctx?: CallContext): Promise<DestroyResult> {
    return this.call({ op: 'destroy_dek', keyId });
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

/** The same Kms interface as createKms(), served by a progressdb-kms daemon. Connects lazily. */
export function createRemoteKms(opts: RemoteKmsOptions): Kms {
  const ep = parseEndpoint(opts.endpoint);
  const transport = opts.transport ?? (ep.scheme === 'tcp' ? 'tcp' : 'http');
  if (ep.port === 0)
    throw kmsError('CONFIG_INVALID', `endpoint "${opts.endpoint}": port 0 cannot be connected to`);
  if (transport === 'http' && ep.scheme === 'tcp') {
    throw kmsError('CONFIG_INVALID', 'a tcp:// endpoint cannot use the http transport');
  }
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const retries = opts.retries ?? 2;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1)
    throw kmsError('CONFIG_INVALID', 'timeoutMs must be >= 1');
  if (!Number.isInteger(retries) || retries < 0 || retries > 10) {
    throw kmsError('CONFIG_INVALID', 'retries must be an integer from 0 to 10');
  }
  const common = { host: ep.host, port: ep.port, tlsOptions: opts.tls, token: opts.token, timeoutMs };
  const impl: RemoteTransport =
    transport === 'tcp'
      ? new TcpTransport(common)
      : new HttpTransport({ ...common, secure: ep.scheme === 'https' || opts.tls !== undefined });
  return new RemoteKms(impl, retries);
}
