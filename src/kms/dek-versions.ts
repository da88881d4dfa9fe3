/**
 * DEK version arithmetic: pure functions on a DekRecord, no registry, no workers (the role of
 * Vault's keysutil policy). Each change returns a new record, or the same object for "no change",
 * and throws a CodedError when the change is not allowed; the caller applies it inside a registry
 * transaction, so a function sees the record as committed and a race shows up as a failed check.
 */
import { type CodedError, kmsError } from '../errors.js';
import { ciphertextKeyVersion } from '../format.js';
import type { DekRef } from '../worker-abi/index.js';

export interface DekVersionRecord {
  v: number;
  /** KEK version this DEK version is wrapped under. */
  kek: number;
  wrapped: Uint8Array;
  createdAt: string;
}

export interface DekRecord {
  keyId: string;
  threadId: string;
  createdAt: string;
  /** `pending-deletion`: destroyDek with a deletion window; refused for every use until then. */
  state: 'active' | 'pending-deletion' | 'destroyed';
  current: number;
  versions: DekVersionRecord[];
  destroyedAt?: string;
  /** While pending deletion: when the key is destroyed unless its deletion is cancelled (ISO). */
  deletionDueAt?: string;
}

/**
 * Whether this state of a record (undefined: deleted) leaves keys that no worker may keep: the
 * whole key destroyed, or versions before the current one destroyed (versions are numbered from
 * 1 with no gaps until some are destroyed).
 */
export function dropsKeyMaterial(record: DekRecord | undefined): boolean {
  return record === undefined || record.state !== 'active' || record.versions.length < record.current;
}

/** One DEK version rewrapped elsewhere: applied only if the record still holds `from`. */
export interface VersionRewrap {
  v: number;
  from: Uint8Array;
  to: Uint8Array;
  toKek: number;
}

/** A change that removed versions, with the versions it removed (for the audit line). */
export interface Destroyed {
  record: DekRecord;
  destroyed: number[];
}

/**
 * The record itself if it is active; a destroyed key is KEY_NOT_FOUND like an unknown one, a key
 * pending deletion KEY_PENDING_DELETION.
 */
export function requireActive(record: DekRecord): DekRecord {
  if (record.state === 'pending-deletion') throw pendingDeletionError(record);
  if (record.state !== 'active') throw kmsError('KEY_NOT_FOUND', `no key ${record.keyId}`);
  return record;
}

/** The refusal of any use of a key pending deletion; names when it goes, so a caller can still act. */
export function pendingDeletionError(record: DekRecord): CodedError {
  return kmsError(
    'KEY_PENDING_DELETION',
    `key ${record.keyId} is pending deletion: it is destroyed at ${record.deletionDueAt} unless its deletion is cancelled`,
  );
}

export function findVersion(record: DekRecord, v: number): DekVersionRecord | undefined {
  return record.versions.find((x) => x.v === v);
}

/** The version new data is encrypted under. A record without it is corrupt, not missing. */
export function currentVersion(record: DekRecord): DekVersionRecord {
  const current = findVersion(record, record.current);
  if (current === undefined) {
    throw kmsError('STORE_CORRUPT', `key ${record.keyId} lacks its current version ${record.current}`);
  }
  return current;
}

/** The version a rotation adds: one above every version the record holds or has held. */
export function nextVersion(record: DekRecord): number {
  let max = record.current;
  for (const x of record.versions) if (x.v > max) max = x.v;
  return max + 1;
}

/**
 * Adds `version` and makes it current. CONFLICT when the record already reached that version
 * (another rotation committed between the caller's read and this transaction).
 */
export function addVersion(record: DekRecord, version: DekVersionRecord): DekRecord {
  requireActive(record);
  if (nextVersion(record) > version.v) {
    throw kmsError('CONFLICT', `key ${record.keyId} was rotated concurrently; retry`);
  }
  return { ...record, current: version.v, versions: [...record.versions, version] };
}

/**
 * Largest key version: versions travel as u32 on the bridge (0xFFFFFFFF means absent there), so a
 * larger keep_from_version must be refused before it is sent, or it would wrap to a small one.
 */
export const MAX_KEY_VERSION = 0xfffffffe;

/** Checks the argument of destroyVersionsBefore before any lookup. */
export function checkKeepFromVersion(keepFromVersion: unknown): number {
  if (!Number.isInteger(keepFromVersion) || (keepFromVersion as number) < 1) {
    throw kmsError('INVALID_INPUT', 'keep_from_version must be a positive integer');
  }
  if ((keepFromVersion as number) > MAX_KEY_VERSION) {
    throw kmsError('INVALID_INPUT', `keep_from_version must be at most ${MAX_KEY_VERSION}`);
  }
  return keepFromVersion as number;
}

/**
 * Removes every version below `keepFromVersion`. The current version always stays: asking to
 * keep less than it is INVALID_INPUT. Keeping every version is no change.
 */
export function destroyVersionsBefore(record: DekRecord, keepFromVersion: number): Destroyed {
  checkKeepFromVersion(keepFromVersion);
  requireActive(record);
  if (keepFromVersion > record.current) {
    throw kmsError(
      'INVALID_INPUT',
      `keep_from_version ${keepFromVersion} is above the current version ${record.current}`,
    );
  }
  const destroyed = record.versions.filter((x) => x.v < keepFromVersion).map((x) => x.v);
  if (destroyed.length === 0) return { record, destroyed };
  return {
    record: { ...record, versions: record.versions.filter((x) => x.v >= keepFromVersion) },
    destroyed,
  };
}

/** Crypto-shreds the key: a tombstone without versions. Destroying a tombstone is no change. */
export function destroyAll(record: DekRecord, now: string): Destroyed {
  if (record.state === 'destroyed') return { record, destroyed: [] };
  const { deletionDueAt: _, ...rest } = record;
  return {
    record: { ...rest, state: 'destroyed', versions: [], destroyedAt: now },
    destroyed: record.versions.map((x) => x.v),
  };
}

/**
 * destroyDek with a deletion window: disables the key at once, destroyed at `dueAt` (ISO). A key
 * already pending keeps its due time, a destroyed one stays so: both are no change.
 */
export function scheduleDestruction(record: DekRecord, dueAt: string): DekRecord {
  if (record.state !== 'active') return record;
  return { ...record, state: 'pending-deletion', deletionDueAt: dueAt };
}

/**
 * Makes a key pending deletion active again, every version as it was, while its window lasts at
 * `nowMs`. A destroyed key, or one whose window has ended, is KEY_NOT_FOUND (too late); any other
 * KEY_NOT_PENDING_DELETION.
 */
export function cancelDestruction(record: DekRecord, nowMs: number): DekRecord {
  if (record.state === 'destroyed') {
    throw kmsError(
      'KEY_NOT_FOUND',
      `key ${record.keyId} was destroyed at ${record.destroyedAt}: its deletion can no longer be cancelled`,
    );
  }
  if (record.state !== 'pending-deletion') {
    throw kmsError('KEY_NOT_PENDING_DELETION', `key ${record.keyId} is not pending deletion`);
  }
  const due = deletionDueMs(record);
  if (due !== null && due <= nowMs) {
    throw kmsError(
      'KEY_NOT_FOUND',
      `the deletion window of key ${record.keyId} ended at ${record.deletionDueAt}: it is being destroyed`,
    );
  }
  const { deletionDueAt: _, ...rest } = record;
  return { ...rest, state: 'active' };
}

/** When a key pending deletion falls due (ms since the epoch); null for any other key. */
export function deletionDueMs(record: DekRecord): number | null {
  if (record.state !== 'pending-deletion' || record.deletionDueAt === undefined) return null;
  const due = Date.parse(record.deletionDueAt);
  return Number.isFinite(due) ? due : null;
}

/** Destroys a key pending deletion once its window has ended at `nowMs`; else no change. */
export function destroyIfDue(record: DekRecord, nowMs: number): Destroyed {
  const due = deletionDueMs(record);
  if (due === null || due > nowMs) return { record, destroyed: [] };
  return destroyAll(record, new Date(nowMs).toISOString());
}

/**
 * Compare-and-set of rewrapped versions: each applies only while the record still holds the
 * wrapped bytes it was made from, so a concurrent rewrap, rotation or destroy is never undone.
 * Returns the same record when nothing applied (and for a destroyed key), else a new one, and the
 * rewraps that applied. `rewraps` may be in any order; one version appears at most once.
 */
export function applyVersionRewraps(
  record: DekRecord,
  rewraps: readonly VersionRewrap[],
): { record: DekRecord; applied: number } {
  if (record.state !== 'active') return { record, applied: 0 };
  let versions: DekVersionRecord[] | null = null;
  let applied = 0;
  for (const rewrap of rewraps) {
    const source = versions ?? record.versions;
    const at = source.findIndex((x) => x.v === rewrap.v);
    const held = source[at];
    if (held === undefined || Buffer.compare(held.wrapped, rewrap.from) !== 0) continue;
    versions ??= [...record.versions];
    versions[at] = { ...held, kek: rewrap.toKek, wrapped: rewrap.to };
    applied++;
  }
  return versions === null ? { record, applied } : { record: { ...record, versions }, applied };
}

/**
 * KEK reference-count changes for replacing `before` by `after` (either may be absent: a create
 * or a delete), keyed by KEK version; added to `deltas`, which may span several records.
 */
export function addKekRefDeltas(
  deltas: Map<number, number>,
  before: DekRecord | undefined,
  after: DekRecord | undefined,
): Map<number, number> {
  if (before !== undefined) for (const x of before.versions) deltas.set(x.kek, (deltas.get(x.kek) ?? 0) - 1);
  if (after !== undefined) for (const x of after.versions) deltas.set(x.kek, (deltas.get(x.kek) ?? 0) + 1);
  return deltas;
}

/**
 * DekRefs per record object. The registry hands out the same decoded record until it changes, so
 * this is a per-version cache that invalidates itself. The wrapped bytes are copied once into
 * their own small buffer: LMDB's decoded bytes are views into large buffers, and a structured
 * clone of a view copies its whole backing store on every task.
 */
const dekRefs = new WeakMap<DekRecord, RecordRefs>();

interface RecordRefs {
  refs: DekRef[];
  /** [the current version's ref], or [] when the record lacks it: what most data ops use, made once. */
  current: readonly DekRef[];
}

function recordRefs(record: DekRecord): RecordRefs {
  let cached = dekRefs.get(record);
  if (cached === undefined) {
    const refs = record.versions.map((x) => ({
      keyId: record.keyId,
      keyVersion: x.v,
      kekVersion: x.kek,
      wrapped: new Uint8Array(x.wrapped),
    }));
    const current = refs.find((ref) => ref.keyVersion === record.current);
    cached = { refs, current: current === undefined ? [] : [current] };
    dekRefs.set(record, cached);
  }
  return cached;
}

/** The worker's view of one version of `record`, or undefined for a version it does not hold. */
export function dekRef(record: DekRecord, version: number): DekRef | undefined {
  return recordRefs(record).refs.find((ref) => ref.keyVersion === version);
}

/**
 * The DekRefs a data op uses: encrypt the current version; decrypt the version the ciphertext
 * names; reencrypt [current, named]. A ciphertext naming a version the record does not hold
 * (malformed, or destroyed) is DECRYPT_FAILED, exactly as a failed tag would be. The arrays are
 * shared: never change one.
 */
export function dataOpRefs(
  record: DekRecord,
  op: 'encrypt' | 'decrypt' | 'reencrypt',
  input: Uint8Array,
): readonly DekRef[] {
  const refs = recordRefs(record);
  const currentRefs = refs.current;
  const current = currentRefs[0];
  if (current === undefined) {
    throw kmsError('STORE_CORRUPT', `key ${record.keyId} lacks its current version ${record.current}`);
  }
  if (op === 'encrypt') return currentRefs;
  const version = ciphertextKeyVersion(input);
  if (op === 'decrypt' && version === current.keyVersion) return currentRefs;
  const named = refs.refs.find((ref) => ref.keyVersion === version);
  if (named === undefined) throw kmsError('DECRYPT_FAILED');
  return op === 'decrypt' ? [named] : [current, named];
}
