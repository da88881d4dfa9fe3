/**
 * Every error ProgressDB and its KMS can raise, with a stable code and the HTTP status it maps to.
 *
 * Codes are part of the public contract (HTTP bodies, TCP bridge frames, audit lines): never rename
 * one. 4xx codes are the caller's fault and become `UserError`; 5xx codes are ours (or a dependency's)
 * and become `ServiceError`, so handlers can tell them apart with `instanceof` and never leak a stack
 * trace for either.
 */
export const ERROR_CATALOGUE = {
  // 400: the request itself is wrong
  INVALID_INPUT: { status: 400, message: 'invalid input' },
  MALFORMED_JSON: { status: 400, message: 'request body is not valid JSON' },
  MALFORMED_BASE64: { status: 400, message: 'field is not valid standard base64' },
  MALFORMED_FRAME: { status: 400, message: 'malformed bridge frame' },
  UNSUPPORTED_OPERATION: { status: 400, message: 'unsupported operation' },
  // 401/403: who is calling
  UNAUTHENTICATED: { status: 401, message: 'authentication required' },
  FORBIDDEN: { status: 403, message: 'not allowed' },
  // 404/405/409/410
  KEY_NOT_FOUND: { status: 404, message: 'key not found' },
  NOT_FOUND: { status: 404, message: 'not found' },
  METHOD_NOT_ALLOWED: { status: 405, message: 'method not allowed' },
  CONFLICT: { status: 409, message: 'conflict' },
  ROTATION_IN_PROGRESS: { status: 409, message: 'a rotation is already running' },
  /** destroyDek with a deletion window: the key is disabled until cancelDeletion or its destruction. */
  KEY_PENDING_DELETION: {
    status: 409,
    message: 'the key is pending deletion: every use is refused until its deletion is cancelled',
  },
  KEY_NOT_PENDING_DELETION: { status: 409, message: 'the key is not pending deletion' },
  REKEY_REFUSED: { status: 409, message: 'a replica of the cluster refused the master re-key' },
  // 413/415/422
  PAYLOAD_TOO_LARGE: { status: 413, message: 'payload too large' },
  UNSUPPORTED_MEDIA_TYPE: { status: 415, message: 'expected application/json' },
  DECRYPT_FAILED: { status: 422, message: 'decryption failed: data was tampered with, or wrong key or AAD' },
  // 5xx: our side
  INTERNAL: { status: 500, message: 'internal error' },
  NOT_READY: { status: 503, message: 'not ready' },
  KMS_UNAVAILABLE: { status: 503, message: 'KMS unavailable' },
  /** A cluster replica without a live etcd lease (or etcd without quorum): try another replica. */
  REGISTRY_UNAVAILABLE: { status: 503, message: 'the KMS registry (etcd) is unavailable to this replica' },
  AUDIT_WRITE_FAILED: { status: 503, message: 'audit log write failed; operation refused' },
  TIMEOUT: { status: 504, message: 'timed out' },
  // start-up and configuration (reported by the CLIs with exit code 1)
  CONFIG_INVALID: { status: 500, message: 'invalid configuration' },
  MASTER_KEY_MISSING: { status: 500, message: 'no master key configured' },
  MASTER_KEY_INVALID: { status: 500, message: 'master key must be 32 bytes written as 64 hex characters' },
  MASTER_KEY_FILE_OPEN: {
    status: 500,
    message: 'master key file is accessible by group or others (chmod 600, or allow it explicitly)',
  },
  MASTER_KEY_MISMATCH: {
    status: 500,
    message: 'master key does not match this data directory (it cannot unwrap the stored KEK)',
  },
  MASTER_KEY_REFUSED: {
    status: 500,
    message: 'a master key must not be given to the server in external KMS mode',
  },
  AUDIT_UNWRITABLE: { status: 500, message: 'audit log is not writable' },
  AUDIT_SIGNING_KEY_INVALID: {
    status: 500,
    message: 'the audit signing key file is missing, unreadable or not one keygen --audit-signing-key made',
  },
  DATA_DIR_LOCKED: { status: 500, message: 'data directory is in use by another process' },
  STORE_CORRUPT: { status: 500, message: 'stored record is corrupt' },
  /** An etcd cluster prefix that `migrate` is copying into: no replica may start on it yet. */
  REGISTRY_MIGRATING: { status: 500, message: 'the registry is being migrated; finish the migration first' },
  /** `migrate` copies only into an empty cluster prefix. */
  REGISTRY_NOT_EMPTY: { status: 500, message: 'the target registry already holds keys' },
  ADDRESS_IN_USE: { status: 500, message: 'cannot listen: the address is already in use' },
  LISTEN_FAILED: { status: 500, message: 'cannot listen on the configured address' },
} as const satisfies Record<string, { status: number; message: string }>;

export type ErrorCode = keyof typeof ERROR_CATALOGUE;

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.hasOwn(ERROR_CATALOGUE, value);
}

export function statusOf(code: ErrorCode): number {
  return ERROR_CATALOGUE[code].status;
}

/** Base of both error kinds. `message` is safe to show a caller; it never holds key material. */
export abstract class CodedError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  /** Optional structured detail (field names, limits); safe to show. */
  readonly details: Readonly<Record<string, unknown>> | undefined;

  constructor(code: ErrorCode, message?: string, details?: Record<string, unknown>, options?: ErrorOptions) {
    super(message ?? ERROR_CATALOGUE[code].message, options);
    this.code = code;
    this.status = ERROR_CATALOGUE[code].status;
    this.details = details;
  }

  toJSON(): { code: ErrorCode; message: string } {
    return { code: this.code, message: this.message };
  }
}

/** The caller's mistake (4xx): bad input, unknown key, failed authentication, tampered data. */
export class UserError extends CodedError {
  override readonly name = 'UserError';
}

/** Our side failed or is not ready (5xx), or start-up configuration is wrong. */
export class ServiceError extends CodedError {
  override readonly name = 'ServiceError';
}

/** Builds the right error kind for a code. */
export function kmsError(
  code: ErrorCode,
  message?: string,
  details?: Record<string, unknown>,
  options?: ErrorOptions,
): CodedError {
  return ERROR_CATALOGUE[code].status < 500
    ? new UserError(code, message, details, options)
    : new ServiceError(code, message, details, options);
}

/**
 * Maps anything thrown to a CodedError. Unknown errors become INTERNAL with a generic message, so a
 * stray exception text (which could quote input) never reaches a caller; the original is kept as
 * `cause` for server-side logs.
 */
export function toCodedError(err: unknown): CodedError {
  if (err instanceof CodedError) return err;
  if (err && typeof err === 'object' && isErrorCode((err as { code?: unknown }).code)) {
    const e = err as { code: ErrorCode; message?: unknown };
    return kmsError(e.code, typeof e.message === 'string' ? e.message : undefined);
  }
  return new ServiceError('INTERNAL', undefined, undefined, { cause: err });
}

/** The wire shape used by HTTP bodies and bridge error frames. */
export interface ErrorBody {
  error: { code: ErrorCode; message: string };
}

export function errorBody(err: CodedError): ErrorBody {
  return { error: { code: err.code, message: err.message } };
}

/** Rebuilds an error received over the wire (HTTP or bridge) from its code and message. */
export function fromWire(code: unknown, message: unknown): CodedError {
  return isErrorCode(code)
    ? kmsError(code, typeof message === 'string' ? message : undefined)
    : new ServiceError('INTERNAL', typeof message === 'string' ? message : undefined);
}
