/**
 * The etcd side of a cluster's master re-key vote (ClusterRekeyVote in store.ts; the protocol is
 * in src/kms/cluster-rekey.ts).
 *
 * `rekey/record` holds the proposal, put under the proposer's lease: if the proposer dies before
 * it commits, etcd deletes the record with the lease and every replica goes back to the current
 * key on its own. Each replica answers under its own lease at `rekey/answer/<replicaId>`, so a
 * replica that goes away takes its answer along; the proposer counts the members alive now, not
 * the answers once given. The commit replaces the record (in the KEK transaction) with its
 * committed state, which carries no lease and stays.
 */
import type { Etcd3 } from 'etcd3';
import { type CodedError, kmsError } from '../../errors.js';
import type { ClusterRekeyVote, RekeyRecord, StoreChange, StoreEntry } from './store.js';

export const REKEY_RECORD = 'rekey/record';
const ANSWERS = 'rekey/answer/';

interface AnswerRecord {
  id: string;
  ok: boolean;
  reason?: string;
  at: string;
}

export interface RekeyVoteHost {
  client: Etcd3;
  etcdKey(key: string): string;
  encode(value: unknown): Buffer;
  decode(bytes: Buffer): unknown;
  watch(prefix: string, onChange: (change: StoreChange) => void): () => void;
  range(prefix: string): Promise<StoreEntry[]>;
  /** This process's replica id and its current lease (a rejoin changes it). */
  replicaId: string;
  leaseId(): string;
  /** The prefix of the member keys (etcd-membership.ts). */
  membersPrefix: string;
}

function unavailable(what: string, err: unknown): CodedError {
  return kmsError('REGISTRY_UNAVAILABLE', `cannot reach etcd to ${what} (${(err as Error).message})`);
}

export class EtcdRekeyVote implements ClusterRekeyVote {
  readonly key = REKEY_RECORD;
  readonly #host: RekeyVoteHost;

  constructor(host: RekeyVoteHost) {
    this.#host = host;
  }

  async #get(): Promise<{ record: RekeyRecord; modRevision: string } | undefined> {
    const { client, etcdKey, decode } = this.#host;
    try {
      const kv = (await client.get(etcdKey(REKEY_RECORD)).exec()).kvs[0];
      return kv === undefined
        ? undefined
        : { record: decode(kv.value) as RekeyRecord, modRevision: kv.mod_revision };
    } catch (err) {
      throw unavailable('read the re-key record', err);
    }
  }

  async read(): Promise<RekeyRecord | undefined> {
    return (await this.#get())?.record;
  }

  async propose(record: RekeyRecord): Promise<void> {
    const { client, etcdKey, encode } = this.#host;
    const current = await this.#get();
    if (current?.record.state === 'proposed') {
      throw kmsError(
        'CONFLICT',
        `a master re-key proposed by ${current.record.by} at ${current.record.proposedAt} is still pending`,
      );
    }
    const key = etcdKey(REKEY_RECORD);
    let committed: boolean;
    try {
      const res = await client
        .if(key, 'Mod', '==', current?.modRevision ?? 0)
        .then(client.put(key).value(encode(record)).lease(this.#host.leaseId()))
        .commit();
      committed = res.succeeded;
    } catch (err) {
      throw unavailable('propose the re-key', err);
    }
    if (!committed) throw kmsError('CONFLICT', 'another master re-key was proposed at the same moment');
  }

  async withdraw(id: string): Promise<void> {
    const { client, etcdKey } = this.#host;
    const current = await this.#get().catch(() => undefined);
    if (current === undefined || current.record.id !== id || current.record.state !== 'proposed') return;
    const key = etcdKey(REKEY_RECORD);
    // Unreachable etcd: the proposal lapses with this process's lease instead.
    await client
      .if(key, 'Mod', '==', current.modRevision)
      .then(client.delete().key(key))
      .commit()
      .catch(() => undefined);
  }

  async answer(id: string, refusal?: string): Promise<void> {
    const { client, etcdKey, encode, replicaId } = this.#host;
    const value: AnswerRecord = { id, ok: refusal === undefined, at: new Date().toISOString() };
    if (refusal !== undefined) value.reason = refusal;
    try {
      await client
        .put(etcdKey(ANSWERS + replicaId))
        .value(encode(value))
        .lease(this.#host.leaseId())
        .exec();
    } catch (err) {
      throw unavailable('answer the re-key proposal', err);
    }
  }

  async awaitAnswers(id: string, timeoutMs: number): Promise<void> {
    const { membersPrefix, replicaId } = this.#host;
    const members = new Set<string>();
    const answers = new Map<string, AnswerRecord | undefined>();
    let listed = false;
    let settle: (err?: Error) => void = () => undefined;
    const done = new Promise<void>((resolve, reject) => {
      settle = (err) => (err ? reject(err) : resolve());
    });
    const silent = () => [...members].filter((m) => answers.get(m)?.id !== id);
    const review = () => {
      for (const m of members) {
        const answer = answers.get(m);
        if (answer?.id === id && !answer.ok) {
          settle(kmsError('REKEY_REFUSED', `replica ${m} refused the new master key: ${answer.reason}`));
        }
      }
      if (listed && silent().length === 0) settle();
    };
    // Listen before listing: what the watch hears is newer than any listing that races it.
    const heardMembers = new Set<string>();
    const offMembers = this.#host.watch(membersPrefix, ({ key, value }) => {
      const member = key.slice(membersPrefix.length);
      if (member === replicaId) return;
      heardMembers.add(member);
      if (value === undefined) members.delete(member);
      else members.add(member);
      review();
    });
    const heardAnswers = new Set<string>();
    const offAnswers = this.#host.watch(ANSWERS, ({ key, value }) => {
      const member = key.slice(ANSWERS.length);
      heardAnswers.add(member);
      answers.set(member, value as AnswerRecord | undefined);
      review();
    });
    const timer = setTimeout(() => {
      settle(
        kmsError(
          'REGISTRY_UNAVAILABLE',
          `replicas ${silent().join(', ')} did not answer the re-key proposal in ${timeoutMs} ms; it was withdrawn and nothing changed`,
        ),
      );
    }, timeoutMs);
    try {
      const [memberEntries, answerEntries] = await Promise.all([
        this.#host.range(membersPrefix),
        this.#host.range(ANSWERS),
      ]).catch((err) => {
        throw unavailable('list the replicas for the re-key vote', err);
      });
      for (const { key } of memberEntries) {
        const member = key.slice(membersPrefix.length);
        if (member !== replicaId && !heardMembers.has(member)) members.add(member);
      }
      for (const { key, value } of answerEntries) {
        const member = key.slice(ANSWERS.length);
        if (!heardAnswers.has(member)) answers.set(member, value as AnswerRecord);
      }
      listed = true;
      review();
      await done;
    } finally {
      clearTimeout(timer);
      offMembers();
      offAnswers();
    }
  }

  onRecord(onChange: (record: RekeyRecord | undefined) => void): () => void {
    return this.#host.watch(REKEY_RECORD, (change) => {
      if (change.key === REKEY_RECORD) onChange(change.value as RekeyRecord | undefined);
    });
  }
}
