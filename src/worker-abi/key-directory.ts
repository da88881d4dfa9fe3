/**
 * The key directory: a SharedArrayBuffer of fixed-size entries, each a DEK version the main thread
 * has sent to the workers (its wrapped bytes, ids and versions; never key material). An op then
 * names its key by entry index and generation, two integers in its slot, instead of a DekRef and
 * an AuditFields object cloned into every task: with thousands of thread keys, that per-key clone
 * (and the worker re-rendering each key's audit fields) cost more than the crypto.
 *
 * The main thread is the only writer (src/kms/dek-directory.ts); it rewrites an entry only once no
 * task in flight names it, and bumps its generation when it does. A worker reads an entry the first
 * time it meets an (index, generation) pair and keeps what it read.
 */
import type { DekRef } from './tasks.js';

/** Bytes per entry: room for a wrapped key and two ids of the lengths the KMS and server make. */
export const DIRECTORY_ENTRY_BYTES = 384;

// Int32 slots at the start of each entry; the variable part follows at ENTRY_HEADER_BYTES.
const kGeneration = 0;
const kKeyVersion = 1;
const kKekVersion = 2;
const kWrappedLength = 3;
const kKeyIdLength = 4;
/** -1 when the key has no thread id. */
const kThreadIdLength = 5;
const ENTRY_HEADER_SLOTS = 6;
const ENTRY_HEADER_BYTES = ENTRY_HEADER_SLOTS * 4;

/** A DEK version as a directory entry holds it; `index` and `generation` name it in an op. */
export interface DirectoryEntry extends DekRef {
  index: number;
  generation: number;
  threadId: string | undefined;
}

export interface KeyDirectoryInit {
  buffer: SharedArrayBuffer;
  capacity: number;
}

export function newKeyDirectory(capacity: number): KeyDirectoryInit {
  return { buffer: new SharedArrayBuffer(capacity * DIRECTORY_ENTRY_BYTES), capacity };
}

/** A view of one directory's buffer: the main thread writes through it, the workers read. */
export class KeyDirectoryView {
  readonly capacity: number;
  readonly #words: Int32Array;
  readonly #bytes: Buffer;

  constructor(init: KeyDirectoryInit) {
    this.capacity = init.capacity;
    this.#words = new Int32Array(init.buffer);
    this.#bytes = Buffer.from(init.buffer);
  }

  /**
   * Writes entry `index` as `ref` under `generation` (the generation last, with a barrier, so a
   * reader that sees it sees the rest). False, with nothing written, when it does not fit.
   */
  write(index: number, generation: number, ref: DekRef, threadId: string | undefined): boolean {
    const keyIdBytes = Buffer.byteLength(ref.keyId, 'utf8');
    const threadIdBytes = threadId === undefined ? 0 : Buffer.byteLength(threadId, 'utf8');
    if (ENTRY_HEADER_BYTES + ref.wrapped.length + keyIdBytes + threadIdBytes > DIRECTORY_ENTRY_BYTES) {
      return false;
    }
    const word = (index * DIRECTORY_ENTRY_BYTES) / 4;
    const words = this.#words;
    words[word + kKeyVersion] = ref.keyVersion;
    words[word + kKekVersion] = ref.kekVersion;
    words[word + kWrappedLength] = ref.wrapped.length;
    words[word + kKeyIdLength] = keyIdBytes;
    words[word + kThreadIdLength] = threadId === undefined ? -1 : threadIdBytes;
    let at = index * DIRECTORY_ENTRY_BYTES + ENTRY_HEADER_BYTES;
    this.#bytes.set(ref.wrapped, at);
    at += ref.wrapped.length;
    at += this.#bytes.write(ref.keyId, at, 'utf8');
    if (threadId !== undefined) this.#bytes.write(threadId, at, 'utf8');
    Atomics.store(words, word + kGeneration, generation);
    return true;
  }

  /**
   * Entry `index` as written under `generation`, or null if it now holds another (a bug) or was
   * never written (generations start at 1).
   */
  read(index: number, generation: number): DirectoryEntry | null {
    if (index < 0 || index >= this.capacity || generation === 0) return null;
    const word = (index * DIRECTORY_ENTRY_BYTES) / 4;
    const words = this.#words;
    if (Atomics.load(words, word + kGeneration) !== generation) return null;
    const wrappedLength = words[word + kWrappedLength] as number;
    const keyIdLength = words[word + kKeyIdLength] as number;
    const threadIdLength = words[word + kThreadIdLength] as number;
    let at = index * DIRECTORY_ENTRY_BYTES + ENTRY_HEADER_BYTES;
    const wrapped = new Uint8Array(this.#bytes.subarray(at, at + wrappedLength));
    at += wrappedLength;
    const keyId = this.#bytes.toString('utf8', at, at + keyIdLength);
    at += keyIdLength;
    const threadId = threadIdLength < 0 ? undefined : this.#bytes.toString('utf8', at, at + threadIdLength);
    return {
      index,
      generation,
      keyId,
      keyVersion: words[word + kKeyVersion] as number,
      kekVersion: words[word + kKekVersion] as number,
      wrapped,
      threadId,
    };
  }
}
