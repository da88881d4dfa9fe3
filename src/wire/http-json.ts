/**
 * The HTTP JSON shapes of KMS results, written by the daemon's routes and read back by the HTTP
 * client. Every response field is a JSON string (numbers too, binary as standard base64), so
 * clients in any language read them the same way; lists of versions are comma-separated.
 */
import { kmsError } from '../errors.js';
import { MAX_AAD_BYTES, MAX_CIPHERTEXT_BYTES, MAX_ID_LENGTH } from '../kms/validate-args.js';
import type { KmsOp } from '../ops/index.js';
import type { DekInfo, DestroyResult, EncryptResult, KmsHealth, RotationStatus } from '../protocol.js';
import { decodeBase64Field } from './base64.js';

export type WireObject = Record<string, unknown>;

/** Characters of the padded base64 of `bytes` bytes. */
const base64Length = (bytes: number) => 4 * Math.ceil(bytes / 3);
/** A JSON encoder may write any character of an id as a `\uXXXX` escape: 6 bytes per UTF-16 unit. */
const MAX_ID_JSON_BYTES = MAX_ID_LENGTH * 6;
/** Field names, quotes, brackets and room for a pretty-printing client's whitespace. */
const JSON_ENVELOPE_BYTES = 1024;
/**
 * The largest request body one operation on the largest input the KMS accepts needs:
 * `{"batch_input":[{"key_id","ciphertext","aad"}]}` with the longest id, the largest ciphertext
 * and the largest AAD in base64 (4/3 of their size). Answers to it are smaller.
 */
export const MAX_OP_BODY_BYTES =
  base64Length(MAX_CIPHERTEXT_BYTES) + base64Length(MAX_AAD_BYTES) + MAX_ID_JSON_BYTES + JSON_ENVELOPE_BYTES;

/** Where each typed operation lives on the HTTP API. */
export const HTTP_ROUTES = {
  create_dek_for_thread: { method: 'POST', path: '/create_dek_for_thread' },
  get_wrapped: { method: 'GET', path: '/get_wrapped' },
  encrypt: { method: 'POST', path: '/encrypt' },
  decrypt: { method: 'POST', path: '/decrypt' },
  reencrypt: { method: 'POST', path: '/reencrypt' },
  rewrap: { method: 'POST', path: '/rewrap' },
  rotate_dek: { method: 'POST', path: '/rotate_dek' },
  destroy_dek_versions_before: { method: 'POST', path: '/destroy_dek_versions_before' },
  destroy_dek: { method: 'POST', path: '/destroy_dek' },
  rotate_kek: { method: 'POST', path: '/rotate_kek' },
  rotation_status: { method: 'GET', path: '/rotate_kek' },
  health: { method: 'GET', path: '/health' },
} as const satisfies Record<KmsOp, { method: 'GET' | 'POST'; path: string }>;

// --- reading (client) ---------------------------------------------------------------------------

function badResponse(field: string): Error {
  return kmsError('INTERNAL', `unexpected response from the KMS daemon: field "${field}"`);
}

export function wireString(o: WireObject, field: string): string {
  const v = o[field];
  if (typeof v !== 'string') throw badResponse(field);
  return v;
}

function wireOptionalString(o: WireObject, field: string): string | null {
  return o[field] === undefined ? null : wireString(o, field);
}

const UINT = /^\d{1,15}$/;

export function wireUint(o: WireObject, field: string): number {
  const v = wireString(o, field);
  if (!UINT.test(v)) throw badResponse(field);
  return Number(v);
}

function wireUintList(o: WireObject, field: string): number[] {
  const v = wireString(o, field);
  if (v === '') return [];
  return v.split(',').map((part) => {
    if (!UINT.test(part)) throw badResponse(field);
    return Number(part);
  });
}

export function wireBytes(o: WireObject, field: string): Buffer {
  try {
    return decodeBase64Field(wireString(o, field), field);
  } catch {
    throw badResponse(field);
  }
}

export function dekInfoFromWire(o: WireObject): DekInfo {
  return {
    keyId: wireString(o, 'key_id'),
    threadId: wireString(o, 'thread_id'),
    kekId: wireString(o, 'kek_id'),
    kekVersion: wireUint(o, 'kek_version'),
    keyVersion: wireUint(o, 'key_version'),
    wrapped: wireBytes(o, 'wrapped'),
    createdAt: wireString(o, 'created_at'),
  };
}

export function encryptResultFromWire(o: WireObject): EncryptResult {
  return { ciphertext: wireBytes(o, 'ciphertext'), keyVersion: wireUint(o, 'key_version') };
}

export function plaintextFromWire(o: WireObject): Buffer {
  return wireBytes(o, 'plaintext');
}

export function destroyResultFromWire(o: WireObject): DestroyResult {
  return { keyId: wireString(o, 'key_id'), destroyedVersions: wireUintList(o, 'destroyed_versions') };
}

const ROTATION_STATES = new Set(['idle', 'running', 'completed']);

export function rotationStatusFromWire(o: WireObject): RotationStatus {
  const state = wireString(o, 'state');
  if (!ROTATION_STATES.has(state)) throw badResponse('state');
  const target = wireOptionalString(o, 'target_kek_version');
  if (target !== null && !UINT.test(target)) throw badResponse('target_kek_version');
  return {
    state: state as RotationStatus['state'],
    kekId: wireString(o, 'kek_id'),
    activeKekVersion: wireUint(o, 'active_kek_version'),
    targetKekVersion: target === null ? null : Number(target),
    done: wireUint(o, 'done'),
    total: wireUint(o, 'total'),
    startedAt: wireOptionalString(o, 'started_at'),
    finishedAt: wireOptionalString(o, 'finished_at'),
    kekVersions: wireUintList(o, 'kek_versions'),
  };
}

export function healthFromWire(o: WireObject): KmsHealth {
  const rotation = o.rotation;
  if (typeof rotation !== 'object' || rotation === null) throw badResponse('rotation');
  return {
    ok: wireString(o, 'ok') === 'true',
    mode: 'external',
    kekId: wireString(o, 'kek_id'),
    activeKekVersion: wireUint(o, 'active_kek_version'),
    dekCount: wireUint(o, 'dek_count'),
    poolThreads: wireUint(o, 'pool_threads'),
    queueDepth: wireUint(o, 'queue_depth'),
    rotation: rotationStatusFromWire(rotation as WireObject),
  };
}
