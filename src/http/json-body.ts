/**
 * The one JSON request body reader of both HTTP programs (the daemon and the server). The size
 * limit is enforced while streaming: a declared Content-Length over the limit is refused before
 * reading, and a chunked body is refused as soon as it passes the limit, so an oversized body is
 * never buffered whole. Nesting depth is checked before parsing; the text is parsed once.
 */
import type { IncomingMessage } from 'node:http';
import { kmsError } from '../errors.js';
import { jsonDepthExceeds } from '../wire/json-depth.js';

export interface JsonBodyLimits {
  /** Largest body, in bytes. */
  maxBytes: number;
  /** Deepest nesting of objects and arrays. */
  maxDepth: number;
}

function isJsonContentType(header: string | undefined): boolean {
  if (header === undefined) return false;
  const semi = header.indexOf(';');
  const type = (semi === -1 ? header : header.slice(0, semi)).trim().toLowerCase();
  return type === 'application/json';
}

function tooLarge(limit: number) {
  return kmsError('PAYLOAD_TOO_LARGE', `request body exceeds the limit of ${limit} bytes`, { limit });
}

/**
 * The parsed body, or undefined when it is empty: whether no body is an error, and which, is the
 * route's to say. Errors: UNSUPPORTED_MEDIA_TYPE, PAYLOAD_TOO_LARGE, MALFORMED_JSON, and
 * INVALID_INPUT for a body nested too deep or cut short.
 */
export function readJsonBody(req: IncomingMessage, limits: JsonBodyLimits): Promise<unknown> {
  if (!isJsonContentType(req.headers['content-type'])) {
    return Promise.reject(
      kmsError('UNSUPPORTED_MEDIA_TYPE', 'send the body as Content-Type: application/json'),
    );
  }
  const limit = limits.maxBytes;
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > limit) return Promise.reject(tooLarge(limit));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let settled = false;
    const fail = (err: Error) => {
      if (settled) return;
      settled = true;
      cleanup();
      reject(err);
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        // Stop buffering; the error reply carries Connection: close so the rest is never read.
        req.pause();
        fail(tooLarge(limit));
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => {
      if (settled) return;
      settled = true;
      cleanup();
      try {
        if (size === 0) return resolve(undefined);
        // Most bodies arrive in one chunk: no copy then.
        const only = chunks.length === 1 ? chunks[0] : undefined;
        resolve(parse(only ?? Buffer.concat(chunks, size), limits.maxDepth));
      } catch (err) {
        reject(err);
      }
    };
    const onError = () => fail(kmsError('INVALID_INPUT', 'request body could not be read'));
    const onClose = () => fail(kmsError('INVALID_INPUT', 'request body was cut short'));
    const cleanup = () => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
      req.off('close', onClose);
    };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('close', onClose);
  });
}

function parse(bytes: Buffer, maxDepth: number): unknown {
  // Deep nesting is valid JSON, so it is an input error rather than MALFORMED_JSON.
  if (jsonDepthExceeds(bytes, maxDepth)) {
    throw kmsError('INVALID_INPUT', `request body is nested deeper than ${maxDepth} levels`);
  }
  try {
    return JSON.parse(bytes.toString('utf8'));
  } catch {
    // The parser's message quotes the input, so it is not passed on.
    throw kmsError('MALFORMED_JSON');
  }
}

export function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
