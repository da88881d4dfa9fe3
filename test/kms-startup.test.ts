/**
 * Start-up (src/kms/startup.ts) against a registry that behaves like a cluster replica's: what
 * another replica wrote reaches this one's view only through watch events, or a fresh read.
 */
import test from 'ava';
import type { CryptoPool } from '../src/kms/pool.js';
import type { KekMeta, KekRecord, Registry } from '../src/kms/registry/index.js';
import { type StartUpDeps, startUp } from '../src/kms/startup.js';
import { createLogger } from '../src/log.js';

/** A replica whose peer won the race to make KEK version 1; `masterKeyMatches`: the check-kek answer. */
function losingReplica(masterKeyMatches: boolean) {
  const winner: KekRecord = {
    kekId: 'kek_winner',
    version: 1,
    wrapped: new Uint8Array(72),
    createdAt: 'then',
    refs: 0,
  };
  // The view: empty until refresh() reads the store, as when the watch events are still on the way.
  let meta: KekMeta | undefined;
  let keks = new Map<number, KekRecord>();
  const seen = { refreshes: 0, checked: [] as number[][], notes: [] as string[] };
  const registry = {
    kekMeta: () => meta,
    kek: (version: number) => keks.get(version),
    keks: () => [...keks.values()],
    kcv: async () => new Uint8Array(16),
    initKek: async () => false,
    refresh: async () => {
      seen.refreshes++;
      meta = { kekId: 'kek_winner', activeVersion: 1, createdAt: 'then' };
      keks = new Map([[1, winner]]);
    },
  };
  const pool = {
    workersReported: async () => {},
    run: async (task: { keks: { version: number }[] }) => {
      seen.checked.push(task.keks.map((k) => k.version));
      return { ok: masterKeyMatches, kcv: null };
    },
  };
  const deps = {
    dataDir: 'the-data-dir',
    log: createLogger('test', 'silent'),
    registry: registry as unknown as Registry,
    pool: pool as unknown as CryptoPool,
    auditFile: null,
    auditHeads: null,
    newKek: async () => ({ wrapped: new Uint8Array(72), kcv: new Uint8Array(16) }),
    note: async (audit: { op: string }) => {
      seen.notes.push(audit.op);
    },
    kekRef: (version: number) => {
      const record = keks.get(version);
      return record && { kekId: record.kekId, version, wrapped: record.wrapped };
    },
  } as unknown as StartUpDeps;
  return { deps, seen };
}

test('a replica that loses the race to make KEK version 1 reads the winner’s KEK and proves its master key on it', async (t) => {
  const { deps, seen } = losingReplica(true);
  await startUp(deps);
  t.is(seen.refreshes, 1, 'read again once, after losing');
  t.deepEqual(seen.checked, [[1]], "the master key is checked against the winner's KEK version 1");
  t.deepEqual(seen.notes, ['start']);
});

test('a losing replica with another master key than the winner’s refuses to start', async (t) => {
  const { deps } = losingReplica(false);
  await t.throwsAsync(startUp(deps), { code: 'MASTER_KEY_MISMATCH' });
});
