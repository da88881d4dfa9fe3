/**
 * What the remote Kms needs from a transport (HTTP or TCP bridge), and the error mapping both
 * share: socket failures become KMS_UNAVAILABLE, marked with whether the request may have
 * reached the daemon, so non-idempotent operations are retried only when it surely did not.
 */
import { type CodedError, kmsError } from '../errors.js';
import { type KmsOp, type KmsRequest, REPEATABLE_OPS } from '../ops/index.js';

export interface RemoteTransport {
  /** Runs one typed request; resolves with what its op's `run` returns, rejects with a CodedError. */
  call(req: KmsRequest): Promise<unknown>;
  /** Most bytes of plaintext/ciphertext per batch request before the client splits a batch. */
  readonly maxBatchBytes: number;
  /**
   * Single-item encrypt/decrypt calls made in the same tick may share one batch request: each
   * request costs far more than an item on this transport (frame, syscall, daemon dispatch).
   */
  readonly coalesce?: boolean;
  close(): Promise<void>;
}

/** TLS material for the client, PEM strings or buffers. */
export interface RemoteTlsOptions {
  /** CA that signed the daemon's certificate (default: the system store). */
  ca?: string | Buffer;
  /** Client certificate and key for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
}

/** Error codes of a socket that never carried the request: connect failed. */
const NOT_CONNECTED = new Set([
  'ECONNREFUSED',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EADDRNOTAVAIL',
]);

export function unavailable(message: string, sent: boolean): CodedError {
  return kmsError('KMS_UNAVAILABLE', message, { sent });
}

/** True when the failed request surely never reached the daemon (safe to retry any op). */
export function surelyNotSent(err: CodedError): boolean {
  return err.code === 'KMS_UNAVAILABLE' && err.details?.sent === false;
}

/**
 * Whether a request that failed with `err` may be sent again (to the same replica or another):
 * always when it surely never left; after an unknown outcome only for ops a repeat cannot harm,
 * and only for failures of the transport or the replica, never for an answer about the request.
 */
export function mayRepeat(op: KmsOp, err: CodedError): boolean {
  if (surelyNotSent(err)) return true;
  if (!REPEATABLE_OPS.has(op)) return false;
  return (
    err.code === 'KMS_UNAVAILABLE' ||
    err.code === 'REGISTRY_UNAVAILABLE' ||
    err.code === 'NOT_READY' ||
    err.code === 'TIMEOUT'
  );
}

/**
 * Maps a socket or TLS error to the catalogue. A daemon refusing our client certificate shows up
 * here as a TLS alert, and is reported as the auth failure it is rather than as "unavailable".
 */
export function socketError(err: unknown, where: string, sent: boolean): CodedError {
  const e = err as NodeJS.ErrnoException;
  const code = typeof e?.code === 'string' ? e.code : 'ERROR';
  if (code.includes('ALERT_CERTIFICATE_REQUIRED')) {
    return kmsError('UNAUTHENTICATED', 'the KMS daemon requires a client certificate');
  }
  if (code.includes('ALERT_UNKNOWN_CA') || code.includes('ALERT_BAD_CERTIFICATE')) {
    return kmsError('FORBIDDEN', 'the KMS daemon refused our client certificate');
  }
  return unavailable(`KMS daemon at ${where} unavailable (${code})`, sent && !NOT_CONNECTED.has(code));
}
