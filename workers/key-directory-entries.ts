/**
 * A crypto worker's copy of the key directory entries it has met (src/worker-abi/key-directory.ts),
 * each with the audit fields made from it: one object per key, op and caller that lasts across
 * tasks, so that its audit line part is rendered once (audit-stream.ts) and aggregate tallies are
 * counted against it, not against a fresh clone in every task. Wrapped keys and ids only.
 */
import {
  type AuditCaller,
  type AuditFields,
  auditCallerKey,
  type DirectoryEntry,
  type KeyDirectoryInit,
  KeyDirectoryView,
} from '../src/worker-abi/index.js';
import { WorkerFault } from './fault.js';

/** Audit fields kept per entry: one per op and caller in use (most keys see one or two). */
const FIELDS_PER_ENTRY = 8;

interface KnownEntry extends DirectoryEntry {
  /** fields[i] is the audit fields for callers[i] (canonical callers: compared by identity). */
  callers: AuditCaller[];
  fields: AuditFields[];
}

/** Canonical callers kept at most; past it the table starts over (a daemon with many peers). */
const MAX_CALLERS = 4096;

export class KeyDirectoryEntries {
  readonly #view: KeyDirectoryView;
  readonly #known: (KnownEntry | undefined)[];
  /** One object per distinct caller, so that fields() matches a caller by identity. */
  readonly #callers = new Map<string, AuditCaller>();

  constructor(init: KeyDirectoryInit) {
    this.#view = new KeyDirectoryView(init);
    this.#known = new Array(init.capacity).fill(undefined);
  }

  /** Entry `index` under `generation`, read from the directory the first time. */
  entry(index: number, generation: number): DirectoryEntry {
    const known = this.#known[index];
    if (known !== undefined && known.generation === generation) return known;
    const read = this.#view.read(index, generation);
    // The main thread rewrites an entry only once no task in flight names it.
    if (read === null) throw new WorkerFault('INTERNAL', `key directory entry ${index} is not the one named`);
    const entry: KnownEntry = { ...read, callers: [], fields: [] };
    this.#known[index] = entry;
    return entry;
  }

  /** A task's callers (BatchTask.callers, cloned per task) as the canonical objects fields() takes. */
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
   * The audit fields of an op on `entry` (from entry()) by `caller` (from canonicalCallers()):
   * the same object every time.
   */
  fields(entry: DirectoryEntry, caller: AuditCaller): AuditFields {
    const known = entry as KnownEntry;
    const at = known.callers.indexOf(caller);
    if (at >= 0) return known.fields[at] as AuditFields;
    // The shape and order of the main thread's auditFields(): the same line, byte for byte.
    const fields: AuditFields = {
      op: caller.op,
      keyId: entry.keyId,
      threadId: entry.threadId,
      kekVersion: entry.kekVersion,
      caller: caller.caller,
      remote: caller.remote,
    };
    if (known.callers.length >= FIELDS_PER_ENTRY) {
      known.callers.shift();
      known.fields.shift();
    }
    known.callers.push(caller);
    known.fields.push(fields);
    return fields;
  }
}
