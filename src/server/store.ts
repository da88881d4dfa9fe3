/**
 * Threads and messages in LMDB (`<data-dir>/store`).
 *
 * Keys are chosen so that the reads the API needs are single range scans:
 *   threads   <threadId>                       newest first = reverse key order (ids are time-ordered)
 *   messages  <threadId>:<messageId>           one thread's messages are one contiguous range
 *   jobs      rotate:<threadId> | encrypt-threads | delete:<threadId>   resumable admin work
 *   meta      encrypted                         set once any thread has a DEK
 *
 * A thread record names its DEK (`keyId`) but never holds a wrapped DEK: the KMS keeps those, so
 * destroying the DEK there makes this data dir, and every backup of it, unreadable for that thread.
 * Every write that depends on what it read happens inside one LMDB write transaction.
 */
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { type Database, open, type RootDatabase } from 'lmdb';
import { kmsError } from '../errors.js';
import { createPrivateFiles } from '../private-files.js';

export interface ThreadRecord {
  id: string;
  title: string | null;
  createdAt: string;
  updatedAt: string;
  /** The thread's DEK in the KMS; null for a thread written with encryption off. */
  keyId: string | null;
  /**
   * Lowest DEK version a new write may use. Raised by DEK rotation before it scans the thread, so a
   * write encrypted under the old version that lands after the scan passed it is refused and redone.
   */
  minKeyVersion: number;
  /** Set while the thread is being deleted: it is gone for the API from that moment. */
  deleting: boolean;
}

/** The `delete:<threadId>` job: a thread being deleted, until its records are removed. */
export interface DeleteJob {
  threadId: string;
  keyId: string | null;
  /** Set while the thread's key waits out the KMS's deletion window: its records are kept. */
  deletionDueAt?: string;
}

/** One stored message. Exactly one of `plain` and `ct` is set. */
export interface MessageRecord {
  id: string;
  createdAt: string;
  updatedAt: string;
  /** Incremented on every write; background jobs write back only if it did not change. */
  rev: number;
  /** JSON text of the body (encryption off, or not yet encrypted). */
  plain?: string;
  /** Ciphertext of the body JSON, or of the encrypted fields when `rest` is set. */
  ct?: Uint8Array;
  /** DEK version that made `ct`. */
  kv?: number;
  /** Field policy: JSON text of the body with the encrypted fields taken out. */
  rest?: string;
}

export type MessageContent = Pick<MessageRecord, 'plain' | 'ct' | 'kv' | 'rest'>;

export interface Page<T> {
  items: T[];
  /** Pass back as `cursor` for the next page; null on the last page. */
  nextCursor: string | null;
}

/** What a conditional message write found. */
export type WriteOutcome =
  | { ok: true; record: MessageRecord }
  | { ok: false; reason: 'thread-gone' | 'message-gone' | 'stale' };

const THREAD_END = ';'; // ':' + 1, so `<tid>;` sorts after every `<tid>:<mid>`

function messageKey(threadId: string, messageId: string): string {
  return `${threadId}:${messageId}`;
}

export class Store {
  private constructor(
    private readonly root: RootDatabase,
    private readonly threads: Database<ThreadRecord, string>,
    private readonly messages: Database<MessageRecord, string>,
    private readonly jobs: Database<Record<string, unknown>, string>,
    private readonly meta: Database<unknown, string>,
  ) {}

  static open(dataDir: string): Store {
    const dir = path.join(dataDir, 'store');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    let root: RootDatabase;
    try {
      createPrivateFiles([path.join(dir, 'data.mdb'), path.join(dir, 'lock.mdb')]);
      root = open({ path: dir, maxDbs: 8, compression: false });
    } catch (err) {
      throw kmsError('STORE_CORRUPT', `cannot open the store in ${dir}: ${(err as Error).message}`);
    }
    return new Store(
      root,
      root.openDB<ThreadRecord, string>({ name: 'threads' }),
      root.openDB<MessageRecord, string>({ name: 'messages' }),
      root.openDB<Record<string, unknown>, string>({ name: 'jobs' }),
      root.openDB<unknown, string>({ name: 'meta' }),
    );
  }

  async close(): Promise<void> {
    await this.root.close();
  }

  // ------------------------------------------------------------------------------------------
  // meta

  /** True once any thread was given a DEK: such a data dir cannot be served with encryption off. */
  holdsEncryptedData(): boolean {
    return this.meta.get('encrypted') === true;
  }

  // ------------------------------------------------------------------------------------------
  // threads

  getThread(id: string): ThreadRecord | undefined {
    return this.threads.get(id);
  }

  /** A live (not deleting) thread, or undefined. */
  liveThread(id: string): ThreadRecord | undefined {
    const t = this.threads.get(id);
    return t && !t.deleting ? t : undefined;
  }

  async createThread(record: ThreadRecord): Promise<void> {
    await this.root.transaction(() => {
      if (record.keyId !== null) this.meta.put('encrypted', true);
      this.threads.put(record.id, record);
    });
  }

  listThreads(limit: number, cursor: string | undefined): Page<ThreadRecord> {
    const items: ThreadRecord[] = [];
    let last: string | null = null;
    let more = false;
    // Deleting threads are skipped, so read past them rather than trusting `limit` on the range.
    for (const { key, value } of this.threads.getRange({
      ...(cursor !== undefined && { start: cursor, exclusiveStart: true }),
      reverse: true,
    })) {
      if (value.deleting) continue;
      if (items.length === limit) {
        more = true;
        break;
      }
      items.push(value);
      last = key;
    }
    return { items, nextCursor: more ? last : null };
  }

  /** Ascending thread ids after `after` (for background jobs). */
  threadIdsAfter(after: string | null, limit: number): string[] {
    return Array.from(
      this.threads.getKeys({ ...(after !== null && { start: after, exclusiveStart: true }), limit }),
    );
  }

  /** Records the thread's DEK if it has none yet; returns the thread as stored afterwards. */
  async setThreadKey(threadId: string, keyId: string): Promise<ThreadRecord | undefined> {
    return this.root.transaction(() => {
      const t = this.threads.get(threadId);
      if (!t || t.deleting) return undefined;
      if (t.keyId !== null) return t;
      const updated = { ...t, keyId, updatedAt: new Date().toISOString() };
      this.meta.put('encrypted', true);
      this.threads.put(threadId, updated);
      return updated;
    });
  }

  async raiseMinKeyVersion(threadId: string, version: number): Promise<boolean> {
    return this.root.transaction(() => {
      const t = this.threads.get(threadId);
      if (!t || t.deleting) return false;
      if (t.minKeyVersion < version) this.threads.put(threadId, { ...t, minKeyVersion: version });
      return true;
    });
  }

  /** Marks the thread deleted and records the pending clean-up job, in one transaction. */
  async markDeleting(threadId: string): Promise<ThreadRecord | undefined> {
    return this.root.transaction(() => {
      const t = this.threads.get(threadId);
      if (!t) return undefined;
      if (!t.deleting) this.threads.put(threadId, { ...t, deleting: true });
      this.jobs.put(`delete:${threadId}`, { threadId, keyId: t.keyId });
      return t;
    });
  }

  /** Records that the thread's key waits out the KMS's deletion window, due at `dueAt`. */
  async markPendingDeletion(threadId: string, dueAt: string): Promise<void> {
    await this.root.transaction(() => {
      const job = this.jobs.get(`delete:${threadId}`) as DeleteJob | undefined;
      if (job !== undefined && job.deletionDueAt !== dueAt) {
        this.jobs.put(`delete:${threadId}`, { ...job, deletionDueAt: dueAt });
      }
    });
  }

  /** Threads whose key waits out the KMS's deletion window, oldest thread first. */
  pendingDeletions(): { thread: ThreadRecord; job: DeleteJob }[] {
    const out: { thread: ThreadRecord; job: DeleteJob }[] = [];
    for (const { value } of this.jobsWithPrefix<DeleteJob>('delete:')) {
      const thread = this.threads.get(value.threadId);
      if (thread !== undefined && value.deletionDueAt !== undefined) out.push({ thread, job: value });
    }
    return out;
  }

  /** A thread being deleted made live again, its delete job dropped; undefined if it is not being deleted. */
  async restoreThread(threadId: string): Promise<ThreadRecord | undefined> {
    return this.root.transaction(() => {
      const t = this.threads.get(threadId);
      if (!t?.deleting) return undefined;
      const restored = { ...t, deleting: false };
      this.threads.put(threadId, restored);
      this.jobs.remove(`delete:${threadId}`);
      return restored;
    });
  }

  /** Removes the thread's messages in batches, then the thread and its jobs. */
  async purgeThread(threadId: string, batchSize: number): Promise<void> {
    for (;;) {
      const keys = Array.from(
        this.messages.getKeys({ start: `${threadId}:`, end: `${threadId}${THREAD_END}`, limit: batchSize }),
      );
      if (keys.length === 0) break;
      await this.root.transaction(() => {
        for (const k of keys) this.messages.remove(k);
      });
    }
    await this.root.transaction(() => {
      this.threads.remove(threadId);
      this.jobs.remove(`rotate:${threadId}`);
      this.jobs.remove(`delete:${threadId}`);
    });
  }

  // ------------------------------------------------------------------------------------------
  // messages

  getMessage(threadId: string, messageId: string): MessageRecord | undefined {
    return this.messages.get(messageKey(threadId, messageId));
  }

  /** Newest first, starting below `cursor` (a message id) when given. */
  listMessages(threadId: string, limit: number, cursor: string | undefined): Page<MessageRecord> {
    const items = Array.from(
      this.messages.getRange({
        start: cursor !== undefined ? messageKey(threadId, cursor) : `${threadId}${THREAD_END}`,
        end: `${threadId}:`,
        exclusiveStart: cursor !== undefined,
        reverse: true,
        limit: limit + 1,
      }),
      (e) => e.value,
    );
    const more = items.length > limit;
    if (more) items.pop();
    return { items, nextCursor: more ? (items.at(-1)?.id ?? null) : null };
  }

  /** Oldest first, after message id `after` (for background jobs). */
  scanMessages(threadId: string, after: string | null, limit: number): MessageRecord[] {
    return Array.from(
      this.messages.getRange({
        start: after !== null ? messageKey(threadId, after) : `${threadId}:`,
        end: `${threadId}${THREAD_END}`,
        exclusiveStart: after !== null,
        limit,
      }),
      (e) => e.value,
    );
  }

  /**
   * Writes a message if the thread still accepts it, in one transaction. `stale` means the content
   * no longer meets the thread's requirements (it gained a DEK, or its DEK was rotated after this
   * content was encrypted): the caller encrypts again and retries, so no write can slip past a
   * rotation or encrypt-threads scan under an old key.
   */
  async writeMessage(
    threadId: string,
    messageId: string,
    content: MessageContent,
    mode: 'create' | 'update',
  ): Promise<WriteOutcome> {
    return this.root.transaction((): WriteOutcome => {
      const t = this.threads.get(threadId);
      if (!t || t.deleting) return { ok: false, reason: 'thread-gone' };
      if (!meetsThread(t, content)) return { ok: false, reason: 'stale' };
      const key = messageKey(threadId, messageId);
      const existing = this.messages.get(key);
      if (mode === 'update' && !existing) return { ok: false, reason: 'message-gone' };
      const now = new Date().toISOString();
      const record: MessageRecord = {
        id: messageId,
        createdAt: existing?.createdAt ?? now,
        updatedAt: now,
        rev: (existing?.rev ?? 0) + 1,
        ...content,
      };
      this.messages.put(key, record);
      return { ok: true, record };
    });
  }

  async removeMessage(
    threadId: string,
    messageId: string,
  ): Promise<'removed' | 'thread-gone' | 'message-gone'> {
    return this.root.transaction(() => {
      const t = this.threads.get(threadId);
      if (!t || t.deleting) return 'thread-gone';
      const key = messageKey(threadId, messageId);
      if (this.messages.get(key) === undefined) return 'message-gone';
      this.messages.remove(key);
      return 'removed';
    });
  }

  /**
   * Background-job write-back: replaces each message's content only if its `rev` is still the one the
   * job read (compare-and-set, so a concurrent PUT or DELETE wins), and saves the job's progress in
   * the same transaction, so a crash resumes exactly after the last batch that committed. If any
   * new content no longer meets the thread (re-keyed meanwhile) nothing is written: redo the batch.
   */
  async replaceContents(
    threadId: string,
    updates: readonly { id: string; rev: number; content: MessageContent }[],
    /** The job's progress record, given how many messages this batch actually rewrote. */
    job: { key: string; value: (written: number) => object },
  ): Promise<number | 'stale' | 'thread-gone'> {
    return this.root.transaction(() => {
      const t = this.threads.get(threadId);
      if (!t || t.deleting) return 'thread-gone';
      if (!updates.every((u) => meetsThread(t, u.content))) return 'stale';
      let written = 0;
      for (const u of updates) {
        const key = messageKey(threadId, u.id);
        const current = this.messages.get(key);
        if (!current || current.rev !== u.rev) continue;
        const { plain: _p, ct: _c, kv: _k, rest: _r, ...kept } = current;
        this.messages.put(key, { ...kept, ...u.content, rev: current.rev + 1 });
        written++;
      }
      this.jobs.put(job.key, job.value(written) as Record<string, unknown>);
      return written;
    });
  }

  // ------------------------------------------------------------------------------------------
  // jobs

  getJob<T extends object>(key: string): T | undefined {
    return this.jobs.get(key) as T | undefined;
  }

  async putJob(key: string, value: object): Promise<void> {
    await this.jobs.put(key, value as Record<string, unknown>);
  }

  jobsWithPrefix<T extends object>(prefix: string): { key: string; value: T }[] {
    return Array.from(this.jobs.getRange({ start: prefix, end: `${prefix}\uffff` }), (e) => ({
      key: e.key,
      value: e.value as T,
    }));
  }

  /** Messages stored in one thread (counts its keys: once per job, not per request). */
  messageCount(threadId: string): number {
    return this.messages.getKeysCount({ start: `${threadId}:`, end: `${threadId}${THREAD_END}` });
  }

  /** Record counts for /admin/health, from LMDB's statistics (constant time, no scan). */
  counts(): { threads: number; messages: number } {
    const entries = (db: Database<unknown, string>) =>
      (db.getStats() as { entryCount?: number }).entryCount ?? 0;
    return { threads: entries(this.threads), messages: entries(this.messages) };
  }
}

/** Whether stored content satisfies the thread's current encryption requirements. */
export function meetsThread(thread: ThreadRecord, content: MessageContent): boolean {
  if (thread.keyId === null) return true;
  return content.ct !== undefined && (content.kv ?? 0) >= thread.minKeyVersion;
}
