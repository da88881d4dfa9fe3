/**
 * Every key a crypto worker holds, and nothing else: the root keys derived from the master key,
 * the unwrapped KEK versions and the DEK cache, all in slots of one locked KeyArena. Worker-only.
 */
import fs from 'node:fs';
import { dekIdentity, kekIdentity, WRAP_KIND_DEK, WRAP_KIND_KEK } from '../src/format.js';
import {
  type BatchTask,
  type DekRef,
  type KekRef,
  type KeyMemoryReport,
  type MasterKeyRef,
  readMasterKeySwitch,
} from '../src/worker-abi/index.js';
import { AuthFailure, unwrapKeyInto } from './aead.js';
import { WorkerFault } from './fault.js';
import { KeyArena, RESERVE_SLOTS } from './key-arena.js';
import { KeyCache } from './key-cache.js';
import type { WorkerDirectoryEntry } from './key-directory-entries.js';
import { loadRootKeys, type RootKeys } from './master-key.js';

export class WorkerKeyring {
  #masterKey: MasterKeyRef;
  /** Where a master re-key names the new master key (master-key-switch.ts), and the generation seen. */
  readonly #switch: SharedArrayBuffer | null;
  #switchSeen = 0;
  readonly #arena: KeyArena;
  readonly #deks: KeyCache;
  #roots: RootKeys | null = null;
  /** The previous master key's KEK-wrapping key while a re-key has not committed; else null. */
  #previousWrapKey: Buffer | null = null;
  /**
   * Unwrapped KEK versions with the wrapped bytes they came from. A cached KEK is used only for the
   * same wrapped bytes: a replica that lost a race to make a KEK version (the registry kept the
   * other replica's) must never wrap keys under the one it made.
   */
  readonly #keks = new Map<number, { key: Buffer; wrapped: Uint8Array }>();
  /**
   * Keys resolved during the current task, by DekRef object: a batch of 64 ops on one key does one
   * cache lookup, not 64. Cleared at the end of every task (the cache owns the buffers).
   */
  readonly #taskKeys = new Map<DekRef, Buffer>();

  constructor(
    masterKey: MasterKeyRef,
    dekCacheSize: number,
    masterKeySwitch: SharedArrayBuffer | null = null,
  ) {
    this.#masterKey = masterKey;
    this.#switch = masterKeySwitch;
    this.#arena = new KeyArena(dekCacheSize + RESERVE_SLOTS);
    this.#deks = new KeyCache(dekCacheSize, this.#arena);
  }

  /** The root keys, derived on first use; `created` is told when that happens. */
  roots(created?: (roots: RootKeys) => void): RootKeys {
    this.#followSwitch();
    if (this.#roots === null) {
      this.#roots = loadRootKeys(this.#masterKey, this.#arena);
      created?.(this.#roots);
    }
    return this.#roots;
  }

  /**
   * Takes up a master key switched by a re-key: from now on KEKs are wrapped and unwrapped under
   * the new master key (the previous one still unwraps until the re-key commits). The audit key
   * stays the one this worker's stream began with, since a stream's chain is signed by one key; a
   * worker started later derives its audit key from the new master key.
   */
  #followSwitch(): void {
    if (this.#switch === null) return;
    const choice = readMasterKeySwitch(this.#switch, this.#switchSeen);
    if (choice === null) return;
    this.#switchSeen = choice.generation;
    const changed = JSON.stringify(choice.ref) !== JSON.stringify(this.#masterKey);
    this.#masterKey = choice.ref;
    const roots = this.#roots;
    if (changed && roots !== null) {
      const next = loadRootKeys(choice.ref, this.#arena);
      this.#arena.free(next.auditKey);
      if (this.#previousWrapKey !== null) this.#arena.free(this.#previousWrapKey);
      this.#previousWrapKey = roots.kekWrapKey;
      this.#roots = { kekWrapKey: next.kekWrapKey, auditKey: roots.auditKey };
    }
    if (!choice.acceptPrevious && this.#previousWrapKey !== null) {
      this.#arena.free(this.#previousWrapKey);
      this.#previousWrapKey = null;
    }
  }

  /** Unwraps a stored KEK version into `into`: under the master key, or the previous one mid-re-key. */
  #unwrapKek(ref: KekRef, into: Buffer): void {
    const identity = kekIdentity(ref.kekId, ref.version);
    try {
      unwrapKeyInto(this.roots().kekWrapKey, WRAP_KIND_KEK, 0, identity, ref.wrapped, into);
    } catch (err) {
      const previous = this.#previousWrapKey;
      if (!(err instanceof AuthFailure) || previous === null) throw err;
      unwrapKeyInto(previous, WRAP_KIND_KEK, 0, identity, ref.wrapped, into);
    }
  }

  /** Pins the keys a task resolves until endTask (see KeyCache). */
  beginTask(): void {
    this.#deks.beginTask();
  }

  endTask(): void {
    this.#taskKeys.clear();
    this.#deks.endTask();
  }

  /** A fresh zeroed slot; give it to cacheDek or setKek, or back with free(). */
  alloc(): Buffer {
    return this.#arena.alloc();
  }

  free(key: Buffer): void {
    this.#arena.free(key);
  }

  kek(version: number, refs: readonly KekRef[]): Buffer {
    const ref = refs.find((k) => k.version === version);
    const cached = this.#keks.get(version);
    if (cached !== undefined && (ref === undefined || Buffer.compare(cached.wrapped, ref.wrapped) === 0)) {
      return cached.key;
    }
    // The main thread supplies every KEK version the registry holds for the task's keys.
    if (ref === undefined) {
      throw new WorkerFault('STORE_CORRUPT', `KEK version ${version} is missing from the registry`);
    }
    const key = this.#arena.alloc();
    try {
      this.#unwrapKek(ref, key);
    } catch (err) {
      this.#arena.free(key);
      if (err instanceof AuthFailure) {
        throw new WorkerFault(
          'MASTER_KEY_MISMATCH',
          'the master key cannot unwrap the stored KEK: wrong master key',
        );
      }
      throw err;
    }
    this.setKek(version, key, ref.wrapped);
    return key;
  }

  /** Takes ownership of `key` as KEK `version`, made from (or unwrapped from) `wrapped`. */
  setKek(version: number, key: Buffer, wrapped: Uint8Array): void {
    const previous = this.#keks.get(version);
    if (previous !== undefined && previous.key !== key) this.#arena.free(previous.key);
    this.#keks.set(version, { key, wrapped: new Uint8Array(wrapped) });
  }

  /**
   * A DEK version, unwrapped or cached. Cached keys belong to the cache: never free them. A key
   * directory entry is cached by its index, good for as long as the entry keeps its generation.
   */
  dek(dek: DekRef | WorkerDirectoryEntry, task: BatchTask): Buffer {
    if ('generation' in dek) {
      // The entry keeps its cache entry: a hit is a flag check, not a lookup.
      const held = dek.cachedKey ? this.#deks.use(dek.cachedKey) : undefined;
      if (held !== undefined) return held;
      let cached = this.#deks.lookup(dek.index, dek.generation);
      if (cached === undefined) {
        const key = this.unwrapDek(dek, task);
        cached = this.#deks.set(dek.index, key, dek.keyId, dek.generation);
      }
      dek.cachedKey = cached;
      return cached.key;
    }
    const resolved = this.#taskKeys.get(dek);
    if (resolved !== undefined) return resolved;
    const id = dekCacheId(dek);
    let key = this.#deks.get(id);
    if (key === undefined) {
      key = this.unwrapDek(dek, task);
      this.#deks.set(id, key, dek.keyId);
    }
    this.#taskKeys.set(dek, key);
    return key;
  }

  /** The cached key of a DEK version, if any (owned by the cache). */
  cachedDek(dek: DekRef): Buffer | undefined {
    return this.#deks.get(dekCacheId(dek));
  }

  /** Takes ownership of `key` as the DEK version `dek` names. */
  cacheDek(dek: DekRef, key: Buffer): void {
    this.#deks.set(dekCacheId(dek), key, dek.keyId);
  }

  /** Unwraps a DEK version into a fresh slot, which the caller owns. */
  unwrapDek(dek: DekRef, task: BatchTask): Buffer {
    const kek = this.kek(dek.kekVersion, task.keks);
    const key = this.#arena.alloc();
    try {
      unwrapKeyInto(
        kek,
        WRAP_KIND_DEK,
        dek.kekVersion,
        dekIdentity(dek.keyId, dek.keyVersion),
        dek.wrapped,
        key,
      );
    } catch (err) {
      this.#arena.free(key);
      // A stored wrapped DEK that fails authentication is corrupt (or was swapped): never a user error.
      if (err instanceof AuthFailure) {
        throw new WorkerFault('STORE_CORRUPT', `wrapped DEK ${dek.keyId} failed to unwrap`);
      }
      throw err;
    }
    return key;
  }

  /** Drops (and zeroes) every cached version of a destroyed key. */
  evict(keyId: string): void {
    this.#deks.deleteKey(keyId);
  }

  /** Zeroes every key held; the root keys are derived again on next use. */
  zeroAll(): void {
    this.#taskKeys.clear();
    this.#deks.clear();
    for (const { key } of this.#keks.values()) this.#arena.free(key);
    this.#keks.clear();
    if (this.#roots !== null) {
      this.#arena.free(this.#roots.kekWrapKey);
      this.#arena.free(this.#roots.auditKey);
      this.#roots = null;
    }
    if (this.#previousWrapKey !== null) {
      this.#arena.free(this.#previousWrapKey);
      this.#previousWrapKey = null;
    }
    // Every slot was given back above; this also wipes any a bug might have leaked.
    this.#arena.zeroAll();
  }

  /** What the worker announces at start: how much of its key memory the system locked. */
  memoryReport(threadId: number): KeyMemoryReport {
    return { type: 'key-memory', threadId, ...this.#arena.status(), memlockLimitBytes: memlockLimit() };
  }
}

function dekCacheId(dek: DekRef): string {
  return `${dek.keyId}#${dek.keyVersion}`;
}

/** This process's soft RLIMIT_MEMLOCK in bytes, from /proc (Linux); null if unlimited or unknown. */
function memlockLimit(): number | null {
  try {
    const line = fs
      .readFileSync('/proc/self/limits', 'latin1')
      .split('\n')
      .find((l) => l.startsWith('Max locked memory'));
    const soft = line?.slice('Max locked memory'.length).trim().split(/\s+/)[0];
    return soft === undefined || soft === 'unlimited' ? null : Number(soft);
  } catch {
    return null;
  }
}
