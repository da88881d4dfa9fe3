/**
 * Thread and message operations behind the HTTP routes: what to encrypt with which key, in which
 * order to talk to the KMS and the store so that a failure never leaves a half-written message.
 */

import type { CallContext, ItemResult, Kms } from '../api/index.js';
import { type CodedError, ServiceError, UserError } from '../errors.js';
import type { Logger } from '../log.js';
import { BodyCodec } from './encryption.js';
import type { IdGenerator } from './ids.js';
import type { ServerMetrics } from './metrics.js';
import type { MessageContent, MessageRecord, Page, Store, ThreadRecord } from './store.js';

/** Attempts at a message write whose content went stale meanwhile (thread re-keyed). */
const WRITE_ATTEMPTS = 5;

export interface MessageView {
  id: string;
  thread_id: string;
  body?: unknown;
  error?: { code: string; message: string };
  encrypted: boolean;
  created_at: string;
  updated_at: string;
}

export interface ThreadView {
  id: string;
  title: string | null;
  encrypted: boolean;
  created_at: string;
  updated_at: string;
}

export function threadView(t: ThreadRecord): ThreadView {
  return {
    id: t.id,
    title: t.title,
    encrypted: t.keyId !== null,
    created_at: t.createdAt,
    updated_at: t.updatedAt,
  };
}

function messageView(threadId: string, r: MessageRecord, body: ItemResult<unknown>): MessageView {
  const view: MessageView = {
    id: r.id,
    thread_id: threadId,
    encrypted: r.ct !== undefined,
    created_at: r.createdAt,
    updated_at: r.updatedAt,
  };
  if (body.ok) view.body = body.value;
  else view.error = { code: body.error.code, message: body.error.message };
  return view;
}

/** Who the KMS audit log names for the server's own later checks of a deletion. */
const SERVER_CONTEXT: CallContext = { caller: 'progressdb-server' };
/** setTimeout's longest delay; a longer deletion window is looked at again then. */
const MAX_TIMER_MS = 2_147_483_647;

export interface PendingDeletionView extends ThreadView {
  deletion_due_at: string | null;
  /** Messages kept until the key is destroyed. */
  messages: number;
}

export class ChatService {
  /** Timers that look again at threads whose key waits out the KMS's deletion window. */
  readonly #deletionChecks = new Map<string, NodeJS.Timeout>();

  constructor(
    readonly store: Store,
    /** null when encryption is off. */
    readonly kms: Kms | null,
    readonly codec: BodyCodec,
    private readonly ids: IdGenerator,
    private readonly metrics: ServerMetrics,
    private readonly logger: Logger,
    private readonly purgeBatchSize: number,
  ) {}

  // ------------------------------------------------------------------------------------------
  // threads

  /** Provisions the thread's DEK before anything is stored, so an acknowledged thread has one. */
  async createThread(title: string | null, ctx: CallContext): Promise<ThreadRecord> {
    const id = this.ids.next();
    const keyId = this.kms ? (await this.kms.createDekForThread(id, ctx)).keyId : null;
    const now = new Date().toISOString();
    const record: ThreadRecord = {
      id,
      title,
      createdAt: now,
      updatedAt: now,
      keyId,
      minKeyVersion: 0,
      deleting: false,
    };
    await this.store.createThread(record);
    return record;
  }

  thread(id: string): ThreadRecord {
    const t = this.store.liveThread(id);
    if (!t) throw new UserError('NOT_FOUND', 'thread not found');
    return t;
  }

  listThreads(limit: number, cursor: string | undefined): Page<ThreadRecord> {
    return this.store.listThreads(limit, cursor);
  }

  /**
   * Marks the thread deleted (gone for the API at once), destroys its DEK in the KMS
   * (crypto-shredding: no copy of the data dir can be read after this), then removes its records.
   * A crash or KMS outage in between leaves a `delete:` job that is finished later. With the KMS's
   * deletion window the records stay (hidden) until the key is destroyed, so restoreThread loses
   * nothing.
   */
  async deleteThread(id: string, ctx: CallContext): Promise<void> {
    const t = this.store.getThread(id);
    if (!t) throw new UserError('NOT_FOUND', 'thread not found');
    await this.store.markDeleting(id);
    await this.finishDelete(id, t.keyId, ctx);
  }

  async finishDelete(threadId: string, keyId: string | null, ctx: CallContext): Promise<void> {
    this.#clearDeletionCheck(threadId);
    if (keyId !== null) {
      const kms = this.requireKms();
      let dueAt: string | null = null;
      try {
        const result = await kms.destroyDek(keyId, ctx);
        dueAt = result.deletionDueAt;
        this.logger.info(
          { threadId, keyId, destroyedVersions: result.destroyedVersions, deletionDueAt: dueAt },
          dueAt === null
            ? 'thread deleted: its DEK was destroyed (crypto-shredded)'
            : 'thread deleted: its DEK is destroyed when the KMS deletion window ends',
        );
      } catch (err) {
        // Already gone (a retry after a crash between destroy and purge): nothing left to shred.
        if ((err as CodedError).code !== 'KEY_NOT_FOUND') throw err;
      }
      if (dueAt !== null && !(await this.#keyGone(threadId, keyId, dueAt))) return;
    }
    await this.store.purgeThread(threadId, this.purgeBatchSize);
  }

  /**
   * Whether the key of a thread deleted within the KMS's deletion window is destroyed yet; if not,
   * the thread is looked at again later (its due time, then every second while the KMS's sweep
   * catches up). A key usable again had its deletion cancelled in the KMS: the thread comes back.
   */
  async #keyGone(threadId: string, keyId: string, dueAt: string): Promise<boolean> {
    await this.store.markPendingDeletion(threadId, dueAt);
    const wait = Date.parse(dueAt) - Date.now();
    if (wait > 0) {
      this.#checkDeletionLater(threadId, keyId, wait);
      return false;
    }
    try {
      await this.requireKms().getWrappedDek(keyId, SERVER_CONTEXT);
    } catch (err) {
      const code = (err as CodedError).code;
      if (code === 'KEY_NOT_FOUND') return true;
      if (code !== 'KEY_PENDING_DELETION') throw err;
      this.#checkDeletionLater(threadId, keyId, 1000);
      return false;
    }
    await this.store.restoreThread(threadId);
    return false;
  }

  #checkDeletionLater(threadId: string, keyId: string, ms: number): void {
    this.#clearDeletionCheck(threadId);
    const timer = setTimeout(
      () => {
        this.#deletionChecks.delete(threadId);
        this.finishDelete(threadId, keyId, SERVER_CONTEXT).catch((err: CodedError) => {
          this.logger.warn(
            { threadId, code: err.code },
            'deleting a thread: checked again at the next start',
          );
        });
      },
      Math.min(ms, MAX_TIMER_MS),
    );
    timer.unref();
    this.#deletionChecks.set(threadId, timer);
  }

  #clearDeletionCheck(threadId: string): void {
    clearTimeout(this.#deletionChecks.get(threadId));
    this.#deletionChecks.delete(threadId);
  }

  /** Stops looking at threads pending deletion (at shutdown; the next start looks again). */
  stopDeletionChecks(): void {
    for (const threadId of [...this.#deletionChecks.keys()]) this.#clearDeletionCheck(threadId);
  }

  /** Threads deleted within the KMS's deletion window, not yet purged. */
  pendingDeletions(): PendingDeletionView[] {
    return this.store.pendingDeletions().map(({ thread, job }) => ({
      ...threadView(thread),
      deletion_due_at: job.deletionDueAt ?? null,
      messages: this.store.messageCount(thread.id),
    }));
  }

  /** Restores a thread deleted within the KMS's deletion window: its key first, then the thread. */
  async restoreThread(threadId: string, ctx: CallContext): Promise<ThreadRecord> {
    const pending = this.store.pendingDeletions().find((p) => p.thread.id === threadId);
    if (pending === undefined || pending.job.keyId === null) {
      throw new UserError('NOT_FOUND', 'no thread pending deletion has this id');
    }
    try {
      await this.requireKms().cancelDeletion(pending.job.keyId, ctx);
    } catch (err) {
      // Cancelled in the KMS already: the thread only has to follow.
      if ((err as CodedError).code !== 'KEY_NOT_PENDING_DELETION') throw err;
    }
    this.#clearDeletionCheck(threadId);
    const restored = await this.store.restoreThread(threadId);
    if (restored === undefined) throw new UserError('NOT_FOUND', 'no thread pending deletion has this id');
    this.logger.info({ threadId }, 'thread restored: its deletion was cancelled');
    return restored;
  }

  /** The thread's DEK, creating it for a thread written while encryption was off. */
  async ensureThreadKey(t: ThreadRecord, ctx: CallContext): Promise<ThreadRecord> {
    if (t.keyId !== null) return t;
    const dek = await this.requireKms().createDekForThread(t.id, ctx);
    const updated = await this.store.setThreadKey(t.id, dek.keyId);
    if (!updated) throw new UserError('NOT_FOUND', 'thread not found');
    return updated;
  }

  // ------------------------------------------------------------------------------------------
  // messages

  async createMessage(threadId: string, body: unknown, ctx: CallContext): Promise<MessageView> {
    return this.write(threadId, this.ids.next(), body, 'create', ctx);
  }

  async updateMessage(
    threadId: string,
    messageId: string,
    body: unknown,
    ctx: CallContext,
  ): Promise<MessageView> {
    this.thread(threadId);
    if (!this.store.getMessage(threadId, messageId)) throw new UserError('NOT_FOUND', 'message not found');
    return this.write(threadId, messageId, body, 'update', ctx);
  }

  /**
   * Encrypts first, then stores in one transaction that re-checks the thread: a KMS failure stores
   * nothing, and content made under a key the thread no longer accepts is made again.
   */
  private async write(
    threadId: string,
    messageId: string,
    body: unknown,
    mode: 'create' | 'update',
    ctx: CallContext,
  ): Promise<MessageView> {
    for (let attempt = 0; attempt < WRITE_ATTEMPTS; attempt++) {
      let t = this.thread(threadId);
      if (this.kms && t.keyId === null) t = await this.ensureThreadKey(t, ctx);
      const content: MessageContent =
        t.keyId === null
          ? BodyCodec.plain(body)
          : await this.codec.seal(t.keyId, threadId, messageId, body, ctx);
      const outcome = await this.store.writeMessage(threadId, messageId, content, mode);
      if (outcome.ok) {
        this.metrics.messagesWritten.inc({ encrypted: content.ct !== undefined ? 'true' : 'false' });
        return messageView(threadId, outcome.record, { ok: true, value: body });
      }
      if (outcome.reason === 'thread-gone') throw new UserError('NOT_FOUND', 'thread not found');
      if (outcome.reason === 'message-gone') throw new UserError('NOT_FOUND', 'message not found');
    }
    throw new ServiceError('NOT_READY', 'the thread is being re-keyed; retry the request');
  }

  async getMessage(threadId: string, messageId: string, ctx: CallContext): Promise<MessageView> {
    const t = this.thread(threadId);
    const r = this.store.getMessage(threadId, messageId);
    if (!r) throw new UserError('NOT_FOUND', 'message not found');
    const body = await this.codec.open(t.keyId, threadId, r, ctx);
    return messageView(threadId, r, { ok: true, value: body });
  }

  /** One page, newest first, decrypted with one KMS call. Undecryptable messages carry an `error`. */
  async listMessages(
    threadId: string,
    limit: number,
    cursor: string | undefined,
    ctx: CallContext,
  ): Promise<{ messages: MessageView[]; next_cursor: string | null }> {
    const t = this.thread(threadId);
    const page = this.store.listMessages(threadId, limit, cursor);
    const bodies = await this.codec.openPage(t.keyId, threadId, page.items, ctx);
    return {
      // One body per item, in order.
      messages: page.items.map((r, i) => messageView(threadId, r, bodies[i] as (typeof bodies)[number])),
      next_cursor: page.nextCursor,
    };
  }

  async deleteMessage(threadId: string, messageId: string): Promise<void> {
    const outcome = await this.store.removeMessage(threadId, messageId);
    if (outcome === 'thread-gone') throw new UserError('NOT_FOUND', 'thread not found');
    if (outcome === 'message-gone') throw new UserError('NOT_FOUND', 'message not found');
  }

  requireKms(): Kms {
    if (!this.kms) throw new UserError('CONFLICT', 'encryption is off on this server');
    return this.kms;
  }
}
