/**
 * Copies a single-node registry (a data directory's LMDB) into an etcd cluster prefix, so a KMS
 * that started on one machine can grow into a cluster. Only wrapped material moves; the master key
 * is not needed.
 *
 * Crash safety: a `meta/migrating` marker naming the source is created first (only in an empty
 * target), the records are copied under it, and one last transaction writes the keyring's meta
 * records (`meta/kek`, `meta/format`, `meta/kcv`, `rotation`) and deletes the marker. Until then a
 * replica refuses the target with REGISTRY_MIGRATING, so none can start a fresh keyring over a
 * half-copied one; a re-run from the same source copies everything again (puts overwrite) and
 * finishes. The source is only read, under its data directory lock (no KMS may run on it).
 */
import os from 'node:os';
import path from 'node:path';
import { kmsError } from '../../errors.js';
import { lockDataDir } from '../dir-lock.js';
import { META } from './backup-file.js';
import { MIGRATING, type RotationRecord } from './index.js';
import { LmdbStore } from './lmdb.js';
import { type RegistryOptions, registryLocation } from './location.js';
import { withEtcdStore } from './open.js';
import type { RegistryStore, StoreEntry } from './store.js';

/** Copied as records, in this order; the meta records go last, in the commit. */
const NAMESPACES = ['kek/', 'dek/', 'thread/', 'pending/'] as const;
/** Entries per etcd transaction: within etcd's 128 operations (the group commit merges up to that). */
const PUTS_PER_TXN = 100;
const TXNS_IN_FLIGHT = 4;
const PAGE = 2000;

export interface MigrationMarker {
  /** The source data directory (absolute) and the KEK id it holds: a re-run must name the same. */
  from: string;
  kekId: string;
  host: string;
  startedAt: string;
}

export interface MigrationReport {
  from: string;
  prefix: string;
  kekId: string;
  activeKekVersion: number;
  /** Records copied per namespace, equal in source and target (checked after the commit). */
  counts: Record<(typeof NAMESPACES)[number], number>;
  /** True when an interrupted migration of the same source was finished. */
  resumed: boolean;
}

export interface MigrateOptions {
  fromDataDir: string;
  registry: RegistryOptions;
  /** Called after each transaction with records copied so far and the total. */
  onProgress?: (copied: number, total: number) => void;
}

/** Copies `fromDataDir`'s registry into the etcd registry `registry` names. */
export async function migrateRegistry(opts: MigrateOptions): Promise<MigrationReport> {
  const location = registryLocation(opts.registry);
  if (location.kind !== 'etcd') {
    throw kmsError(
      'CONFIG_INVALID',
      'migrate copies into an etcd registry: give --registry etcd://... or etcds://...',
    );
  }
  const from = path.resolve(opts.fromDataDir);
  // Looked at before the lock and the open, which would create files in a mistyped directory.
  if (LmdbStore.readOnce(from, 'meta/kek') === undefined) {
    throw kmsError('CONFIG_INVALID', `${from} holds no KMS registry (no keyring): nothing to migrate`);
  }
  const lock = lockDataDir(from);
  const source = LmdbStore.open(from);
  try {
    return await withEtcdStore(location, opts.registry, async (target) => {
      const meta = await readSource(source, from);
      const marker: MigrationMarker = {
        from,
        kekId: meta.kekId,
        host: os.hostname(),
        startedAt: new Date().toISOString(),
      };
      const resumed = await claimTarget(target, marker, location.prefix);
      const totals = await Promise.all(NAMESPACES.map((ns) => source.count(ns)));
      const total = totals.reduce((a, b) => a + b, 0);
      let copied = 0;
      for (const ns of NAMESPACES) {
        await copyNamespace(source, target, ns, (n) => {
          copied += n;
          opts.onProgress?.(copied, total);
        });
      }
      const puts: StoreEntry[] = [];
      for (const key of META) {
        const value = await source.get(key);
        if (value !== undefined) puts.push({ key, value });
      }
      await finishCopy(target, marker, puts, location.prefix);
      const counts = {} as MigrationReport['counts'];
      for (const [i, ns] of NAMESPACES.entries()) {
        const copiedHere = await target.count(ns);
        if (copiedHere !== totals[i]) {
          throw kmsError(
            'STORE_CORRUPT',
            `after the copy, etcd holds ${copiedHere} records under ${ns} where the source holds ${totals[i]}`,
          );
        }
        counts[ns] = copiedHere;
      }
      return {
        from,
        prefix: location.prefix,
        kekId: meta.kekId,
        activeKekVersion: meta.active,
        counts,
        resumed,
      };
    });
  } finally {
    await source.close();
    lock.release();
  }
}

/** What the source must be: a registry with a keyring and no rotation in progress. */
async function readSource(source: RegistryStore, from: string): Promise<{ kekId: string; active: number }> {
  const kekMeta = (await source.get('meta/kek')) as { kekId: string; activeVersion: number } | undefined;
  if (kekMeta === undefined) {
    throw kmsError('CONFIG_INVALID', `${from} holds no KMS registry (no keyring): nothing to migrate`);
  }
  const rotation = (await source.get('rotation')) as RotationRecord | undefined;
  if (rotation?.state === 'running') {
    throw kmsError(
      'CONFIG_INVALID',
      `${from} has a KEK rotation in progress (${rotation.done}/${rotation.total}): finish it first (progressdb-kms rotate --data-dir ${from})`,
    );
  }
  return { kekId: kekMeta.kekId, active: kekMeta.activeVersion };
}

function sameMigration(value: unknown, marker: MigrationMarker): boolean {
  const other = value as MigrationMarker | undefined;
  return other?.from === marker.from && other.kekId === marker.kekId;
}

/**
 * Puts the marker into an empty target, or finds one of the same source there (a re-run after an
 * interruption: returns true). Anything else in the target is refused, so nothing is overwritten.
 */
export async function claimTarget(
  target: RegistryStore,
  marker: MigrationMarker,
  prefix: string,
  tool = 'migrate',
): Promise<boolean> {
  const existing = await target.get(MIGRATING);
  if (existing !== undefined) {
    if (sameMigration(existing, marker)) return true;
    const other = existing as MigrationMarker;
    throw kmsError(
      'REGISTRY_NOT_EMPTY',
      `${prefix} is being migrated from ${other.from} on ${other.host} (started ${other.startedAt}), not from ${marker.from}`,
    );
  }
  const held = [
    (await target.get('meta/kek')) !== undefined ? 'a keyring' : null,
    ...(await Promise.all(
      NAMESPACES.map(async (ns) => ((await target.count(ns)) > 0 ? `${ns} records` : null)),
    )),
  ].filter((x) => x !== null);
  if (held.length > 0) {
    throw kmsError(
      'REGISTRY_NOT_EMPTY',
      `${prefix} already holds ${held.join(', ')}: ${tool} copies only into an empty cluster prefix (use another --cluster)`,
    );
  }
  const { committed } = await target.transaction({
    compares: [
      { key: MIGRATING, absent: true },
      { key: 'meta/kek', absent: true },
    ],
    puts: [{ key: MIGRATING, value: marker }],
  });
  if (!committed) throw kmsError('REGISTRY_NOT_EMPTY', `${prefix} was written to while migrate started`);
  return false;
}

/**
 * The last transaction of a copy: the keyring's meta records, and the marker deleted, only if the
 * marker is still this copy's (else REGISTRY_MIGRATING: another copy took over).
 */
export async function finishCopy(
  target: RegistryStore,
  marker: MigrationMarker,
  puts: StoreEntry[],
  prefix: string,
): Promise<void> {
  const current = await target.get(MIGRATING);
  const { committed } = await target.transaction({
    compares: [{ key: MIGRATING, equals: current }],
    puts,
    deletes: [MIGRATING],
  });
  if (!committed || !sameMigration(current, marker)) {
    throw kmsError('REGISTRY_MIGRATING', `another migration took over ${prefix} while this one copied`);
  }
}

/** Copies one namespace page by page, a few transactions of PUTS_PER_TXN in flight. */
async function copyNamespace(
  source: RegistryStore,
  target: RegistryStore,
  ns: string,
  onCopied: (n: number) => void,
): Promise<void> {
  let after: string | undefined;
  for (;;) {
    const page = await source.range(ns, after === undefined ? { limit: PAGE } : { after, limit: PAGE });
    if (page.length === 0) return;
    await copyPage(target, page, onCopied);
    after = (page[page.length - 1] as StoreEntry).key;
  }
}

/** Puts `page` into `target`, a few transactions of PUTS_PER_TXN in flight. */
export async function copyPage(
  target: RegistryStore,
  page: StoreEntry[],
  onCopied: (n: number) => void = () => {},
): Promise<void> {
  const chunks: StoreEntry[][] = [];
  for (let i = 0; i < page.length; i += PUTS_PER_TXN) chunks.push(page.slice(i, i + PUTS_PER_TXN));
  for (let i = 0; i < chunks.length; i += TXNS_IN_FLIGHT) {
    await Promise.all(
      chunks.slice(i, i + TXNS_IN_FLIGHT).map(async (puts) => {
        await target.transaction({ puts });
        onCopied(puts.length);
      }),
    );
  }
}
