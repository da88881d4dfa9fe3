/**
 * A cluster replica's side of a master re-key that another process proposes (rekey.ts has the
 * proposer's side, ClusterRekeyVote in registry/store.ts the record and the answers).
 *
 * On a proposal the replica checks, in a worker, that it reads the new key at the proposed path
 * and that its check value is the proposed one; only then does it switch its workers to the new
 * key with the current one still accepted, and answer yes. It answers no (with the reason) when
 * it cannot read the key or the key is another. Then:
 *  - committed: only the new key from now on;
 *  - withdrawn, or lapsed with its proposer's lease: back to the current key alone.
 * A replica that missed the proposal (it started during the vote, after checking the old key)
 * finds the committed record and takes up the new key then, so no replica is left on a key that
 * no longer opens the registry. Every step is audited; no key bytes leave the workers.
 */
import { type CodedError, toCodedError } from '../errors.js';
import type { Logger } from '../log.js';
import {
  type AuditFields,
  type CheckMasterKeyResult,
  describeMasterKeyRef,
  type MasterKeyRef,
  switchMasterKey,
} from '../worker-abi/index.js';
import type { OpQueue } from './op-queue.js';
import type { CryptoPool } from './pool.js';
import type { Registry } from './registry/index.js';
import { type ClusterRekeyVote, type RekeyRecord, sameValue } from './registry/store.js';

export interface RekeyFollowerDeps {
  registry: Registry;
  pool: Pick<CryptoPool, 'run'>;
  queue: Pick<OpQueue, 'note'>;
  log: Logger;
  masterKeySwitch: SharedArrayBuffer;
  /** The master key this process uses now, and the one it takes up. */
  current(): MasterKeyRef;
  adopt(ref: MasterKeyRef): void;
}

/** What the follower uses, derived from its deps once. */
interface Follow {
  vote: ClusterRekeyVote;
  replicaId: string;
  masterKeySwitch: SharedArrayBuffer;
  current(): MasterKeyRef;
  adopt(ref: MasterKeyRef): void;
  /** Whether `ref`, read on this host by a worker, has check value `kcv` (throws if it cannot be read). */
  check(ref: MasterKeyRef, kcv: Uint8Array): Promise<boolean>;
  /** The registry's key check value, read linearizably. */
  registryKcv(): Promise<Uint8Array | undefined>;
  note(audit: AuditFields): Promise<void>;
  log: Logger;
}

export class RekeyFollower {
  readonly #deps: Follow;
  /** The proposal this replica accepted, and the key it used before. */
  #pending: { record: RekeyRecord; previous: MasterKeyRef } | null = null;
  /** Records are handled one at a time, in the order they were seen. */
  #chain: Promise<void> = Promise.resolve();
  #off: (() => void) | null = null;
  #stopped = false;

  private constructor(deps: Follow) {
    this.#deps = deps;
  }

  /** Follows the re-keys of the cluster the registry belongs to; null for one node. */
  static forCluster(deps: RekeyFollowerDeps): RekeyFollower | null {
    const { registry, pool, queue } = deps;
    const cluster = registry.cluster;
    if (cluster === undefined) return null;
    return new RekeyFollower({
      vote: cluster.rekey,
      replicaId: cluster.replicaId,
      masterKeySwitch: deps.masterKeySwitch,
      current: deps.current,
      adopt: deps.adopt,
      check: async (masterKey, kcv) =>
        (await pool.run<CheckMasterKeyResult>({ type: 'check-master-key', masterKey, kcv })).matches,
      registryKcv: () => registry.kcv(),
      note: (audit) => queue.note(audit),
      log: deps.log,
    });
  }

  /** Follows every change of the record, after handling the one there is now. */
  async start(): Promise<void> {
    this.#off = this.#deps.vote.onRecord((record) => this.#enqueue(record));
    this.#enqueue(await this.#deps.vote.read());
    await this.#chain;
  }

  stop(): void {
    this.#stopped = true;
    this.#off?.();
  }

  #enqueue(record: RekeyRecord | undefined): void {
    this.#chain = this.#chain
      .then(() => (this.#stopped ? undefined : this.#handle(record)))
      .catch((err) => {
        this.#deps.log.error(
          { code: toCodedError(err).code },
          `following a cluster re-key failed: ${(err as Error).message}`,
        );
      });
  }

  #audit(record: RekeyRecord, detail: string): AuditFields {
    return {
      op: 'rekey_master',
      caller: `replica:${record.by}`,
      detail: `${describeMasterKeyRef(record.target)} proposed by ${record.by}: ${detail}`,
    };
  }

  async #handle(record: RekeyRecord | undefined): Promise<void> {
    const pending = this.#pending;
    if (pending !== null && record?.id !== pending.record.id) await this.#settlePending(pending);
    if (record === undefined || record.by === this.#deps.replicaId) return;
    if (record.state === 'proposed') {
      if (this.#pending === null) await this.#accept(record);
    } else if (this.#pending?.record.id === record.id) {
      this.#commit(record);
      await this.#deps.note(this.#audit(record, 'committed: only the new key from now on'));
    } else {
      await this.#catchUp(record);
    }
  }

  async #accept(record: RekeyRecord): Promise<void> {
    const deps = this.#deps;
    let refusal: string | undefined;
    try {
      if (!(await deps.check(record.target, record.kcv))) {
        refusal = `the key at ${describeMasterKeyRef(record.target)} on this replica is not the proposed one (its check value differs)`;
      }
    } catch (err) {
      const coded = err as CodedError;
      refusal = `${coded.code ?? 'INTERNAL'}: ${coded.message}`;
    }
    if (refusal === undefined) {
      this.#pending = { record, previous: deps.current() };
      switchMasterKey(deps.masterKeySwitch, record.target, true);
    }
    await deps.note(
      this.#audit(
        record,
        refusal === undefined ? 'accepted, both keys valid until it commits' : `refused: ${refusal}`,
      ),
    );
    if (refusal !== undefined)
      deps.log.error(`refused the cluster master re-key proposed by ${record.by}: ${refusal}`);
    await deps.vote.answer(record.id, refusal);
  }

  #commit(record: RekeyRecord): void {
    this.#pending = null;
    switchMasterKey(this.#deps.masterKeySwitch, record.target, false);
    this.#deps.adopt(record.target);
    this.#deps.log.warn(
      `the cluster's master key was re-keyed by ${record.by}: this replica now uses ${describeMasterKeyRef(record.target)}. ` +
        'Configure that key for its next start (the old one is refused with MASTER_KEY_MISMATCH).',
    );
  }

  /** The accepted proposal is gone: committed after all (its record replaced since), or back to the current key. */
  async #settlePending(pending: { record: RekeyRecord; previous: MasterKeyRef }): Promise<void> {
    const { record, previous } = pending;
    if (sameValue(await this.#deps.registryKcv(), record.kcv)) {
      this.#commit(record);
      await this.#deps.note(this.#audit(record, 'committed: only the new key from now on'));
      return;
    }
    this.#pending = null;
    switchMasterKey(this.#deps.masterKeySwitch, previous, false);
    this.#deps.log.warn(
      `the master re-key proposed by ${record.by} was withdrawn or lapsed: keeping the current key`,
    );
    await this.#deps.note(this.#audit(record, 'withdrawn or lapsed: back to the current key alone'));
  }

  /** A committed re-key this replica did not vote on: take up its key unless this one is it already. */
  async #catchUp(record: RekeyRecord): Promise<void> {
    const deps = this.#deps;
    if (await deps.check(deps.current(), record.kcv).catch(() => false)) return;
    if (!sameValue(await deps.registryKcv(), record.kcv)) return; // not the registry's key (re-keyed again since)
    const usable = await deps.check(record.target, record.kcv).catch(() => false);
    if (!usable) {
      deps.log.error(
        `the cluster's master key was re-keyed by ${record.by} and this replica cannot read the new key at ` +
          `${describeMasterKeyRef(record.target)}: it cannot unwrap the KEKs any more. Restart it with the new key.`,
      );
      return;
    }
    this.#commit(record);
    await deps.note(
      this.#audit(record, 'committed while this replica started: only the new key from now on'),
    );
  }
}
