/**
 * The KMS over the daemon's HTTP API: node:http(s) with a keep-alive agent, JSON bodies with
 * base64 binary fields, errors rebuilt from `{"error":{code,message}}` with fromWire.
 */
import http from 'node:http';
import https from 'node:https';
import { type CodedError, fromWire, kmsError } from '../errors.js';
import type { KmsRequest } from '../ops/index.js';
import type { DecryptItem, EncryptItem, ItemResult } from '../protocol.js';
import { encodeBase64 } from '../wire/base64.js';
import { formatHostPort } from '../wire/endpoint.js';
import {
  dekInfoFromWire,
  destroyResultFromWire,
  encryptResultFromWire,
  HTTP_ROUTES,
  healthFromWire,
  MAX_OP_BODY_BYTES,
  plaintextFromWire,
  rotationStatusFromWire,
  type WireObject,
} from '../wire/http-json.js';
import { type RemoteTlsOptions, type RemoteTransport, socketError, unavailable } from './transport.js';

export interface HttpTransportOptions {
  host: string;
  port: number;
  /** HTTPS; with `tlsOptions` for a private CA or a client certificate. */
  secure: boolean;
  tlsOptions?: RemoteTlsOptions | undefined;
  token?: string | undefined;
  timeoutMs: number;
}

/**
 * A response body over this is refused: no answer is larger than the request for the largest
 * single call (batches are split into far smaller requests, maxBatchBytes).
 */
const MAX_RESPONSE_BYTES = MAX_OP_BODY_BYTES;

function itemToWire(item: EncryptItem | DecryptItem, field: 'plaintext' | 'ciphertext'): WireObject {
  const data = field === 'plaintext' ? (item as EncryptItem).plaintext : (item as DecryptItem).ciphertext;
  const out: WireObject = { key_id: item.keyId, [field]: encodeBase64(data) };
  if (item.aad !== undefined) out.aad = encodeBase64(item.aad);
  return out;
}

function batchResultsFromWire<T>(o: WireObject, readValue: (item: WireObject) => T): ItemResult<T>[] {
  const results = o.batch_results;
  if (!Array.isArray(results))
    throw kmsError('INTERNAL', 'unexpected response from the KMS daemon: batch_results');
  return results.map((item: WireObject) => {
    const error = item?.error as WireObject | undefined;
    return error
      ? { ok: false, error: fromWire(error.code, error.message) }
      : { ok: true, value: readValue(item) };
  });
}

interface HttpCall {
  method: 'GET' | 'POST';
  path: string;
  body?: WireObject;
  read: (o: WireObject) => unknown;
}

/** The HTTP request for a typed operation, and how to read its answer. */
function httpCallOf(req: KmsRequest): HttpCall {
  const route = HTTP_ROUTES[req.op];
  switch (req.op) {
    case 'create_dek_for_thread':
      return { ...route, body: { thread_id: req.threadId }, read: dekInfoFromWire };
    case 'get_wrapped':
      return {
        ...route,
        path: `${route.path}?key_id=${encodeURIComponent(req.keyId)}`,
        read: dekInfoFromWire,
      };
    case 'encrypt':
      return {
        ...route,
        body: { batch_input: req.items.map((it) => itemToWire(it, 'plaintext')) },
        read: (o) => batchResultsFromWire(o, encryptResultFromWire),
      };
    case 'decrypt':
      return {
        ...route,
        body: { batch_input: req.items.map((it) => itemToWire(it, 'ciphertext')) },
        read: (o) => batchResultsFromWire(o, plaintextFromWire),
      };
    case 'reencrypt':
      return {
        ...route,
        body: itemToWire({ keyId: req.keyId, ciphertext: req.ciphertext, aad: req.aad }, 'ciphertext'),
        read: encryptResultFromWire,
      };
    case 'rewrap':
    case 'rotate_dek':
      return { ...route, body: { key_id: req.keyId }, read: dekInfoFromWire };
    case 'destroy_dek':
      return { ...route, body: { key_id: req.keyId }, read: destroyResultFromWire };
    case 'destroy_dek_versions_before':
      return {
        ...route,
        body: { key_id: req.keyId, keep_from_version: String(req.keepFromVersion) },
        read: destroyResultFromWire,
      };
    case 'rotate_kek':
    case 'rotation_status':
      return { ...route, read: rotationStatusFromWire };
    case 'health':
      return { ...route, read: healthFromWire };
  }
}

export class HttpTransport implements RemoteTransport {
  readonly maxBatchBytes = 512 * 1024;
  private readonly agent: http.Agent;
  private readonly request: typeof http.request;
  private readonly where: string;
  private readonly baseHeaders: Record<string, string>;

  constructor(private readonly opts: HttpTransportOptions) {
    this.where = formatHostPort(opts.host, opts.port);
    const agentOptions = { keepAlive: true, maxSockets: 64, maxFreeSockets: 64, scheduling: 'lifo' as const };
    if (opts.secure) {
      const t = opts.tlsOptions ?? {};
      this.agent = new https.Agent({ ...agentOptions, ca: t.ca, cert: t.cert, key: t.key });
      this.request = https.request;
    } else {
      this.agent = new http.Agent(agentOptions);
      this.request = http.request;
    }
    this.baseHeaders = { accept: 'application/json' };
    if (opts.token !== undefined) this.baseHeaders.authorization = `Bearer ${opts.token}`;
  }

  async call(req: KmsRequest): Promise<unknown> {
    const call = httpCallOf(req);
    const payload = call.body === undefined ? undefined : JSON.stringify(call.body);
    const { status, body } = await this.send(call.method, call.path, payload);
    const parsed = parseJson(body);
    if (status === 200) {
      if (parsed === undefined)
        throw kmsError('INTERNAL', 'unexpected response from the KMS daemon: not JSON');
      return call.read(parsed);
    }
    throw errorOfResponse(status, parsed);
  }

  private send(
    method: string,
    path: string,
    payload: string | undefined,
  ): Promise<{ status: number; body: Buffer }> {
    const headers: Record<string, string> = { ...this.baseHeaders };
    if (payload !== undefined) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = String(Buffer.byteLength(payload));
    }
    return new Promise((resolve, reject) => {
      let connected = false;
      let done = false;
      const finish = (err: CodedError | null, value?: { status: number; body: Buffer }) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(value!);
      };
      const req = this.request({
        agent: this.agent,
        host: this.opts.host,
        port: this.opts.port,
        method,
        path,
        headers,
      });
      const timer = setTimeout(() => {
        const err = connected
          ? kmsError('TIMEOUT', `KMS daemon at ${this.where} did not answer within ${this.opts.timeoutMs} ms`)
          : unavailable(
              `could not connect to the KMS daemon at ${this.where} within ${this.opts.timeoutMs} ms`,
              false,
            );
        finish(err);
        req.destroy();
      }, this.opts.timeoutMs);
      req.on('socket', (socket) => {
        if (req.reusedSocket || !socket.connecting) connected = true;
        else socket.once('connect', () => (connected = true));
      });
      req.on('error', (err) => {
        // A kept-alive socket the daemon closed meanwhile fails before our request was read.
        const stale = req.reusedSocket && (err as NodeJS.ErrnoException).code === 'ECONNRESET';
        finish(socketError(err, this.where, connected && !stale));
      });
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (chunk: Buffer) => {
          size += chunk.length;
          if (size > MAX_RESPONSE_BYTES) {
            finish(kmsError('INTERNAL', 'KMS daemon response is too large'));
            req.destroy();
            return;
          }
          chunks.push(chunk);
        });
        res.on('end', () => finish(null, { status: res.statusCode ?? 0, body: Buffer.concat(chunks, size) }));
        res.on('error', (err) => finish(socketError(err, this.where, true)));
      });
      req.end(payload);
    });
  }

  async close(): Promise<void> {
    this.agent.destroy();
  }
}

function parseJson(body: Buffer): WireObject | undefined {
  try {
    const v: unknown = JSON.parse(body.toString('utf8'));
    return typeof v === 'object' && v !== null ? (v as WireObject) : undefined;
  } catch {
    return undefined;
  }
}

function errorOfResponse(status: number, parsed: WireObject | undefined): CodedError {
  const error = parsed?.error as WireObject | undefined;
  if (error && typeof error === 'object') return fromWire(error.code, error.message);
  // Not our daemon's error shape (a proxy in between, say).
  return status >= 500
    ? unavailable(`KMS endpoint answered HTTP ${status}`, true)
    : kmsError('INTERNAL', `KMS endpoint answered HTTP ${status}`);
}
