/**
 * A crypto worker's copy of the key directory entries it has met (src/worker-abi/key-directory.ts),
 * each with the audit sites made from it (audit-tally.ts): one per key, op and caller that lasts
 * across tasks, so that its audit line part is rendered once and aggregate tallies are counted on
 * it, not against a fresh clone in every task. Wrapped keys and ids only.
 */
import {
  type AuditCaller,
  auditCallerKey,
  type DirectoryEntry,
  type KeyDirectoryInit,
  KeyDirectoryView,
} from '../src/worker-abi/index.js';
import { type AuditSite, auditSite } from './audit-tally.js';
import { WorkerFault } from './fault.js';
import type { CachedKey } from './key-cache.js';

/** Audit sites kept per entry: one per op and caller in use (most keys see one or two). */
const SITES_PER_ENTRY = 8;

/** A directory entry as a worker holds it: with its cached key, once it has been resolved. */
export interface WorkerDirectoryEntry extends DirectoryEntry {
  /** The key cache's entry for this key (keyring.ts): used while live, looked up again after. */
  cachedKey: CachedKey | null;
}

interface KnownEntry extends WorkerDirectoryEntry {
  /** sites[i] is the audit site for callers[i] (canonical callers: compared by identity). */
  callers: AuditCaller[];
  sites: AuditSite[];
  /** The last caller asked for and its site: most keys see one caller, checked first. */
  lastCaller: AuditCaller | null;
  lastSite: AuditSite | null;
}

/** Canonical callers kept at most; past it the table starts over (a daemon with many peers). */
const MAX_CALLERS = 4096;

export class KeyDirectoryEntries {
  readonly #view: KeyDirectoryView;
  readonly #known: (KnownEntry | undefined)[];
  /** One object per distinct caller, so that site() matches a caller by identity. */
  readonly #callers = new Map<string, AuditCaller>();

  constructor(init: KeyDirectoryInit) {
    this.#view = new KeyDirectoryView(init);
    this.#known = new Array(init.capacity).fill(undefined);
  }

  /** Entry `index` under `generation`, read from the directory the first time. */
  entry(index: number, generation: number): WorkerDirectoryEntry {
    const known = this.#known[index];
    if (known !== undefined && known.generation === generation) return known;
    const read = this.#view.read(index, generation);
    // The main thread rewrites an entry only once no task in flight names it.
    if (read === null) throw new WorkerFault('INTERNAL', `key directory entry ${index} is not the one named`);
    const entry: KnownEntry = {
      ...read,
      cachedKey: null,
      callers: [],
      sites: [],
      lastCaller: null,
      lastSite: null,
    };
    this.#known[index] = entry;
    return entry;
  }

  /** A task's callers (BatchTask.callers, cloned per task) as the canonical objects site() takes. */
  canonicalCallers(callers: readonly AuditCaller[]): AuditCaller[] {
    if (this.#callers.size > MAX_CALLERS) this.#callers.clear();
    return callers.map((c) => {
      const key = auditCallerKey(c);
      let canonical = this.#callers.get(key);
      if (canonical === undefined) {
        canonical = { op: c.op, caller: c.caller, remote: c.remote };
        this.#callers.set(key, canonical);
      }
      return canonical;
    });
  }

  /**
   * The audit site of an op on `entry` (from entry()) by `caller` (from canonicalCallers()): the
   * same object every time, its fields the same line the main thread's auditFields() makes.
   */
  site(entry: DirectoryEntry, caller: AuditCaller): AuditSite {
    const known = entry as KnownEntry;
    if (known.lastCaller === caller) return known.lastSite as AuditSite;
    const at = known.callers.indexOf(caller);
    let site: AuditSite;
    if (at >= 0) site = known.sites[at] as AuditSite;
    else {
      // The shape and order of the main thread's auditFields(): the same line, byte for byte.
      site = auditSite({
        op: caller.op,
        keyId: entry.keyId,
        threadId: entry.threadId,
        kekVersion: entry.kekVersion,
        caller: caller.caller,
        remote: caller.remote,
      });
      if (known.callers.length >= SITES_PER_ENTRY) {
        known.callers.shift();
        known.sites.shift();
      }
      known.callers.push(caller);
      known.sites.push(site);
    }
    known.lastCaller = caller;
    known.lastSite = site;
    return site;
  }
}
