/**
 * A crypto worker's copy of the key directory entries it has met (src/worker-abi/key-directory.ts),
 * each with the audit fields made from it: one object per key, op and caller that lasts across
 * tasks, so that its audit line part is rendered once (audit-stream.ts) and aggregate tallies are
 * counted against it, not against a fresh clone in every task. Wrapped keys and ids only.
 */
import {
  type AuditCaller,
  type AuditFields,
  type DirectoryEntry,
  type KeyDirectoryInit,
  KeyDirectoryView,
} from '../src/worker-abi/index.js';
import { WorkerFault } from './fault.js';

/** Audit fields kept per entry: one per op and caller in use (most keys see one or two). */
const FIELDS_PER_ENTRY = 8;

interface KnownEntry extends DirectoryEntry {
  fields: AuditFields[];
}

export class KeyDirectoryEntries {
  readonly #view: KeyDirectoryView;
  readonly #known: (KnownEntry | undefined)[];

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
    const entry: KnownEntry = { ...read, fields: [] };
    this.#known[index] = entry;
    return entry;
  }

  /** The audit fields of an op on `entry` (from entry()) by `caller`: the same object every time. */
  fields(entry: DirectoryEntry, caller: AuditCaller): AuditFields {
    const slots = (entry as KnownEntry).fields;
    for (const fields of slots) {
      if (fields.op === caller.op && fields.caller === caller.caller && fields.remote === caller.remote) {
        return fields;
      }
    }
    // The shape and order of the main thread's auditFields(): the same line, byte for byte.
    const fields: AuditFields = {
      op: caller.op,
      keyId: entry.keyId,
      threadId: entry.threadId,
      kekVersion: entry.kekVersion,
      caller: caller.caller,
      remote: caller.remote,
    };
    if (slots.length >= FIELDS_PER_ENTRY) slots.shift();
    slots.push(fields);
    return fields;
  }
}
