/**
 * What the embedded KMS does before it serves: a new data directory (or a new cluster) gets KEK
 * version 1; an existing one must first prove that the master key unwraps every stored KEK, and
 * only then is anything touched (the key check value of an old registry, the torn tail a crash
 * can leave at the end of the audit log, the start line).
 */
import { randomBytes } from 'node:crypto';
import { kmsError } from '../errors.js';
import type { Logger } from '../log.js';
import type { AuditFields, CheckKekResult, KekRef, NewKekResult, NewKekTask } from '../worker-abi/index.js';
import type { AuditFile } from './audit-file.js';
import type { AuditHeadKeeper } from './audit-head-keeper.js';
import type { CryptoPool } from './pool.js';
import type { Registry } from './registry/index.js';

export interface StartUpDeps {
  dataDir: string;
  log: Logger;
  registry: Registry;
  pool: CryptoPool;
  auditFile: AuditFile | null;
  auditHeads: AuditHeadKeeper | null;
  newKek(task: NewKekTask): Promise<NewKekResult>;
  note(audit: AuditFields): Promise<void>;
  kekRef(version: number): KekRef | undefined;
}

/** Runs the start-up; resolves once the KMS may serve. */
export async function startUp(deps: StartUpDeps): Promise<void> {
  const fresh = deps.registry.kekMeta() === undefined;
  const created = fresh && (await createFirstKek(deps));
  // A replica that lost the race to initialise a cluster reads the winner's KEK again (the
  // registry read everything else when it opened): its watch events may still be on the way, and
  // the KEK metadata and record come on separate watches (seen in a full run: the metadata had
  // arrived, the KEK version it names had not). Then it proves its master key against that KEK
  // like any start on an existing registry.
  if (fresh && !created) await deps.registry.refresh();
  const meta = deps.registry.kekMeta();
  const active = meta === undefined ? undefined : deps.kekRef(meta.activeVersion);
  if (active === undefined)
    throw kmsError('STORE_CORRUPT', 'the active KEK version is missing from the registry');
  if (!created) await proveMasterKey(deps, active);
  await deps.pool.workersReported(WORKER_REPORT_TIMEOUT_MS);
}

/**
 * Cuts the unfinished block a crash (kill -9 during a worker's write) can leave at the end of
 * the audit log, so that new blocks follow the last complete one and the log verifies. None of
 * that block's results was released. Returns the bytes dropped.
 */
function repairAuditLog(deps: StartUpDeps): number {
  const dropped = deps.auditFile?.repairTornTail() ?? 0;
  if (dropped > 0) {
    deps.log.warn(
      `audit log: dropped ${dropped} bytes of an unfinished block left by a crash (no result of it was released)`,
    );
  }
  return dropped;
}

/**
 * KEK version 1 of a new registry. Returns false when another process initialised it first: that
 * one wins (initKek), and the KEK made here is never used.
 */
async function createFirstKek(deps: StartUpDeps): Promise<boolean> {
  repairAuditLog(deps);
  deps.auditHeads?.begin();
  const kekId = `kek_${randomBytes(8).toString('hex')}`;
  const created = await deps.newKek({
    type: 'new-kek',
    kekId,
    version: 1,
    audit: { op: 'start', kekVersion: 1, detail: 'new data directory: created KEK version 1' },
  });
  const now = new Date().toISOString();
  return deps.registry.initKek(
    { kekId, activeVersion: 1, createdAt: now },
    { kekId, version: 1, wrapped: created.wrapped, createdAt: now, refs: 0 },
    created.kcv,
  );
}

/** How long start-up waits for every crypto worker to say whether its key memory is locked. */
const WORKER_REPORT_TIMEOUT_MS = 10_000;

async function proveMasterKey(deps: StartUpDeps, active: KekRef): Promise<void> {
  const { registry } = deps;
  const storedKcv = (await registry.kcv()) ?? null;
  const refs = [active];
  for (const k of registry.keks()) {
    const ref = k.version === active.version ? undefined : deps.kekRef(k.version);
    if (ref !== undefined) refs.push(ref);
  }
  const check = await deps.pool.run<CheckKekResult>({
    type: 'check-kek',
    keks: refs,
    kcv: storedKcv === null ? null : new Uint8Array(storedKcv),
  });
  if (!check.ok) {
    throw kmsError(
      'MASTER_KEY_MISMATCH',
      `the master key does not match the data directory ${deps.dataDir}: it cannot unwrap the stored KEK. ` +
        'Nothing was changed. Use the master key this directory was created with.',
    );
  }
  // Only now, with the key proven, may the directory be touched: a registry from before key check
  // values gets one, then the log is repaired and gets the start line.
  if (storedKcv === null && check.kcv !== null) {
    registry.putKcv(check.kcv);
    deps.log.info('stored the master key check value (registry written by an older version)');
  }
  const dropped = repairAuditLog(deps);
  deps.auditHeads?.begin();
  if (dropped > 0) {
    await deps.note({
      op: 'audit_repair',
      detail: `dropped ${dropped} bytes of a block cut short by a crash`,
    });
  }
  await deps.note({ op: 'start', kekVersion: active.version, detail: `pid ${process.pid}` });
}
