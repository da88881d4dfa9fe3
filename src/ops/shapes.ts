/**
 * Parameters and results that several ops share, each with its JSON record and bridge codec side
 * by side. JSON key order is the order of the record's properties; the bridge order is the
 * codec's, and both are part of the wire contract.
 */

import type {
  DecryptItem,
  DekInfo,
  DestroyResult,
  EncryptResult,
  RotationState,
  RotationStatus,
} from '../api/index.js';
import { kmsError } from '../errors.js';
import { encodeBase64 } from '../wire/base64.js';
import {
  base64,
  type Fields,
  id,
  type JsonCodec,
  nullable,
  oneOf,
  optional,
  plainView,
  record,
  text,
  uint,
  uintList,
} from './fields.js';
import type { BinaryCodec, RequestCodec } from './op.js';

// --- parameters -------------------------------------------------------------------------------

export const KEY_ID = id('key_id');

export interface KeyParams {
  keyId: string;
}

export const keyParamsRecord = record<KeyParams>({ keyId: KEY_ID });

/** The bridge body `str keyId`. */
export function keyParamsBinary<N extends string>(op: N): RequestCodec<N, KeyParams> {
  return {
    write: (w, p) => void w.str(p.keyId),
    read: (r) => ({ op, keyId: r.str() }),
  };
}

export type NoParams = Record<never, never>;

export const noParamsRecord = record<NoParams>({});

/** The (empty) bridge body of an op without parameters. */
export function noParamsBinary<N extends string>(op: N): RequestCodec<N, NoParams> {
  return { write: () => {}, read: () => ({ op }) };
}

/**
 * Keyed data items (encrypt, decrypt, reencrypt) on the bridge: `str keyId, bytes data,
 * optional bytes aad`; the smallest (empty id and data, no AAD) takes 12 bytes.
 */
export const DATA_ITEM_MIN_BYTES = 12;

export function dataItemSizeHint(keyId: string, data: Uint8Array, aad: Uint8Array | undefined): number {
  return DATA_ITEM_MIN_BYTES + keyId.length * 3 + data.byteLength + (aad?.byteLength ?? 0);
}

export const AAD = optional(base64('aad'));

/** A ciphertext to open under a key (decrypt's item, reencrypt's parameters). */
export const ciphertextItemRecord = record<DecryptItem>({
  keyId: KEY_ID,
  ciphertext: base64('ciphertext'),
  aad: AAD,
});

export const ciphertextItemBinary: BinaryCodec<DecryptItem> & { minBytes: number } = {
  write: (w, it) => void w.str(it.keyId).bytes(it.ciphertext).optBytes(it.aad),
  read: (r) => ({ keyId: r.str(), ciphertext: r.bytes(), aad: r.optBytes() }),
  sizeHint: (it) => dataItemSizeHint(it.keyId, it.ciphertext, it.aad),
  minBytes: DATA_ITEM_MIN_BYTES,
};

// --- results ----------------------------------------------------------------------------------

export const dekInfoRecord: JsonCodec<DekInfo> = record<DekInfo>({
  keyId: KEY_ID,
  threadId: text('thread_id'),
  wrapped: base64('wrapped'),
  kekId: text('kek_id'),
  kekVersion: uint('kek_version'),
  keyVersion: uint('key_version'),
  createdAt: text('created_at'),
});

export const dekInfoBinary: BinaryCodec<DekInfo> = {
  write: (w, d) =>
    void w
      .str(d.keyId)
      .str(d.threadId)
      .str(d.kekId)
      .u32(d.kekVersion)
      .u32(d.keyVersion)
      .bytes(d.wrapped)
      .str(d.createdAt),
  read: (r) => ({
    keyId: r.str(),
    threadId: r.str(),
    kekId: r.str(),
    kekVersion: r.u32(),
    keyVersion: r.u32(),
    wrapped: r.bytes(),
    createdAt: r.str(),
  }),
};

export const encryptResultRecord = record<EncryptResult>({
  ciphertext: base64('ciphertext'),
  keyVersion: uint('key_version'),
});

export const encryptResultToWire = encryptResultRecord.toWire;

/**
 * The text JSON.stringify(encryptResultToWire(r)) gives (base64 and decimal digits never need
 * escaping), without building the object or a stringify pass: the hot answer of /encrypt.
 */
export function encryptResultJson(r: EncryptResult): string {
  return `{"ciphertext":"${encodeBase64(r.ciphertext)}","key_version":"${r.keyVersion}"}`;
}

export const encryptResultBinary: BinaryCodec<EncryptResult> = {
  write: (w, v) => void w.bytes(v.ciphertext).u32(v.keyVersion),
  read: (r) => ({ ciphertext: r.bytes(), keyVersion: r.u32() }),
  sizeHint: (v) => 12 + v.ciphertext.length,
};

/** `deletion_due_at` only while a deletion window runs (null is left out). */
export const destroyResultRecord: JsonCodec<DestroyResult> = record<DestroyResult>({
  keyId: KEY_ID,
  destroyedVersions: uintList('destroyed_versions'),
  deletionDueAt: nullable(text('deletion_due_at')),
});

export const destroyResultBinary: BinaryCodec<DestroyResult> = {
  write: (w, v) => {
    w.str(v.keyId).u32(v.destroyedVersions.length);
    for (const n of v.destroyedVersions) w.u32(n);
    w.optStr(v.deletionDueAt);
  },
  read: (r) => {
    const keyId = r.str();
    const n = r.count(4);
    const destroyedVersions: number[] = [];
    for (let i = 0; i < n; i++) destroyedVersions.push(r.u32());
    return { keyId, destroyedVersions, deletionDueAt: r.optStr() };
  },
};

const ROTATION_STATES: readonly RotationState[] = ['idle', 'running', 'completed'];

const rotationStatusFields: Fields<RotationStatus> = {
  state: oneOf('state', ROTATION_STATES),
  kekId: text('kek_id'),
  activeKekVersion: uint('active_kek_version'),
  done: uint('done'),
  total: uint('total'),
  kekVersions: uintList('kek_versions'),
  targetKekVersion: nullable(uint('target_kek_version')),
  startedAt: nullable(text('started_at')),
  finishedAt: nullable(text('finished_at')),
};

/** Absent values (null) are left out rather than sent as an empty string. */
export const rotationStatusRecord = record<RotationStatus>(rotationStatusFields);

/** The one view of a KEK rotation's status in the product server's answers (same names and order). */
export const rotationStatusView = plainView(rotationStatusFields);

/** The state as its index in ROTATION_STATES; counts as f64. */
export const rotationStatusBinary: BinaryCodec<RotationStatus> = {
  write: (w, s) => {
    w.u8(ROTATION_STATES.indexOf(s.state)).str(s.kekId).u32(s.activeKekVersion).optU32(s.targetKekVersion);
    w.f64(s.done).f64(s.total).optStr(s.startedAt).optStr(s.finishedAt);
    w.u32(s.kekVersions.length);
    for (const v of s.kekVersions) w.u32(v);
  },
  read: (r) => {
    const state = ROTATION_STATES[r.u8()];
    if (state === undefined) throw kmsError('MALFORMED_FRAME', 'unknown rotation state');
    const status: RotationStatus = {
      state,
      kekId: r.str(),
      activeKekVersion: r.u32(),
      targetKekVersion: r.optU32(),
      done: r.f64(),
      total: r.f64(),
      startedAt: r.optStr(),
      finishedAt: r.optStr(),
      kekVersions: [],
    };
    const n = r.count(4);
    for (let i = 0; i < n; i++) status.kekVersions.push(r.u32());
    return status;
  },
};
