/**
 * Which master key a KMS's workers use, switched at run time by a master re-key (src/kms/rekey.ts):
 * a small SharedArrayBuffer the main thread writes and each worker reads before it uses its root
 * keys, so no task can run between a switch and its being seen. It holds a reference (a path, a
 * variable name), never key bytes. A seqlock: the generation is odd while the main thread writes.
 * Layout: Int32 [0] generation, [1] JSON byte length, [2] 1 when the previous key is still
 * accepted for unwrapping (until the re-key commits); bytes from 16: the MasterKeyRef as JSON.
 */
import type { MasterKeyRef } from './tasks.js';

const HEADER_BYTES = 16;
const CAPACITY_BYTES = 8192;

export interface MasterKeyChoice {
  /** Even, and above 0 once switched. */
  generation: number;
  ref: MasterKeyRef;
  /** Unwrap with the previous master key too, if the new one fails (both are valid until commit). */
  acceptPrevious: boolean;
}

export function newMasterKeySwitch(): SharedArrayBuffer {
  return new SharedArrayBuffer(HEADER_BYTES + CAPACITY_BYTES);
}

/** Main thread only: tells every worker to use `ref` from its next task on. */
export function switchMasterKey(shared: SharedArrayBuffer, ref: MasterKeyRef, acceptPrevious: boolean): void {
  const json = Buffer.from(JSON.stringify(ref), 'utf8');
  if (json.length > CAPACITY_BYTES) throw new RangeError('master key reference too long');
  const header = new Int32Array(shared, 0, 3);
  Atomics.add(header, 0, 1);
  new Uint8Array(shared, HEADER_BYTES, json.length).set(json);
  Atomics.store(header, 1, json.length);
  Atomics.store(header, 2, acceptPrevious ? 1 : 0);
  Atomics.add(header, 0, 1);
}

/** The switch's state if its generation is not `seen` (and it was switched at all); else null. */
export function readMasterKeySwitch(shared: SharedArrayBuffer, seen: number): MasterKeyChoice | null {
  const header = new Int32Array(shared, 0, 3);
  for (;;) {
    const generation = Atomics.load(header, 0);
    if (generation === seen || generation === 0) return null;
    if (generation % 2 === 1) continue; // being written: a few stores, so spin
    const length = Atomics.load(header, 1);
    const acceptPrevious = Atomics.load(header, 2) === 1;
    const json = Buffer.from(new Uint8Array(shared, HEADER_BYTES, length)).toString('utf8');
    if (Atomics.load(header, 0) !== generation) continue;
    return { generation, ref: JSON.parse(json) as MasterKeyRef, acceptPrevious };
  }
}
