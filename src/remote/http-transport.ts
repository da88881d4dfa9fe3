/**
 * The KMS over the daemon's HTTP API: node:http(s) with a keep-alive agent, JSON bodies with
 * base64 binary fields, errors rebuilt from `{"error":{code,message}}` with fromWire.
 */
import http from 'node:http';
import https from 'node:https';
import type { ItemResult } from '../api/index.js';
import { type CodedError, fromWire, kmsError } from '../errors.js';
import type { WireObject } from '../ops/fields.js';
import { type KmsRequest, opOf } from '../ops/index.js';
import { formatHostPort } from '../wire/endpoint.js';
import { MAX_OP_BODY_BYTES } from '../wire/http-json.js';
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

function queryOf(fields: WireObject): string {
  const parts = Object.entries(fields).map(
    ([name, value]) => `${encodeURIComponent(name)}=${encodeURIComponent(String(value))}`,
  );
  return parts.length === 0 ? '' : `?${parts.join('&')}`;
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

  /**
   * The op's HTTP request (src/ops/): batchable ops always send `batch_input`, others their
   * parameters as the JSON body (POST) or query (GET); ops without parameters send neither.
   */
  async call(req: KmsRequest): Promise<unknown> {
    const spec = opOf(req.op);
    const { method } = spec.http;
    let path = spec.http.path;
    let payload: string | undefined;
    if (spec.batch) {
      payload = JSON.stringify({
        batch_input: (req as { items: unknown[] }).items.map(spec.json.item.toWire),
      });
    } else {
      const fields = spec.json.request.toWire(req);
      if (method === 'GET') path += queryOf(fields);
      else if (Object.keys(fields).length > 0) payload = JSON.stringify(fields);
    }
    const { status, body } = await this.send(method, path, payload);
    const parsed = parseJson(body);
    if (status === 200) {
      if (parsed === undefined)
        throw kmsError('INTERNAL', 'unexpected response from the KMS daemon: not JSON');
      const read = spec.json.result.fromWire;
      return spec.batch ? batchResultsFromWire(parsed, read) : read(parsed);
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
        if (err || value === undefined) reject(err ?? kmsError('INTERNAL', 'no answer and no error'));
        else resolve(value);
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
