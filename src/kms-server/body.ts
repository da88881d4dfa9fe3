/**
 * Reads a JSON request body with the size limit enforced while streaming: a declared
 * Content-Length over the limit is refused before reading, and a chunked body is refused as soon
 * as it passes the limit, so an oversized body is never buffered whole. Parsed once.
 */
import type { IncomingMessage } from 'node:http';
import { kmsError } from '../errors.js';
import { jsonDepthExceeds } from '../wire/json-depth.js';

/**
 * Deepest nesting a daemon body may have. Every body is flat ({"batch_input":[{...}]} is 3
 * levels), so 64 leaves room for anything legitimate and keeps recursive code far from the stack.
 */
export const MAX_BODY_DEPTH = 64;

function isJsonContentType(header: string | undefined): boolean {
  if (header === undefined) return false;
  const semi = header.indexOf(';');
  const type = (semi === -1 ? header : header.slice(0, semi)).trim().toLowerCase();
  return type === 'application/json';
}

function tooLarge(limit: number) {
  return kmsError('PAYLOAD_TOO_LARGE', `request body exceeds the limit of ${limit} bytes`, { limit });
}

export function readJsonBody(req: IncomingMessage, limit: number): Promise<Record<string, unknown>> {
  if (!isJsonContentType(req.headers['content-type'])) {
    return Promise.reject(kmsError('UNSUPPORTED_MEDIA_TYPE'));
  }
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
        resolve(parseObject(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size)));
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

function parseObject(bytes: Buffer): Record<string, unknown> {
  // Deep nesting is valid JSON, so it is an input error rather than MALFORMED_JSON.
  if (jsonDepthExceeds(bytes, MAX_BODY_DEPTH)) {
    throw kmsError('INVALID_INPUT', `request body is nested deeper than ${MAX_BODY_DEPTH} levels`);
  }
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString('utf8'));
  } catch {
    // The parser's message quotes the input, so it is not passed on.
    throw kmsError('MALFORMED_JSON');
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw kmsError('INVALID_INPUT', 'request body must be a JSON object');
  }
  return value as Record<string, unknown>;
}
