/**
 * Backup and restore of a registry: wrapped material only, so a backup file is as safe to keep as
 * the registry itself (useless without the master key, which is kept apart).
 *
 * A backup is a consistent snapshot (store.ts RegistrySnapshot: LMDB in one read transaction, etcd
 * at one revision), taken while the KMS serves, written as backup-file.ts describes.
 *
 * Restore checks everything before it writes anything: the trailer and checksum, the header
 * against the records, then in a worker that the master key unwraps the backup's KEK (the key
 * check value, CheckKekTask): a wrong key is MASTER_KEY_MISMATCH. The LMDB registry is written
 * under a temporary name and renamed into place complete, so an interrupted restore leaves no
 * registry behind; into etcd it copies as `migrate` does, under a marker (migrate.ts).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Piscina } from 'piscina';
import { kmsError } from '../../errors.js';
import type { CheckKekResult, KekRef, MasterKeyRef } from '../../worker-abi/index.js';
import { AUDIT_FILE_NAME } from '../audit-file.js';
import { lockDataDir } from '../dir-lock.js';
import { runTask, workerFile } from '../pool.js';
import { oneOffWorkerInit } from '../verify-audit.js';
import {
  type BackupHeader,
  corrupt,
  META,
  NAMESPACES,
  readBackup,
  syncDir,
  writeBackup,
} from './backup-file.js';
import type { KekRecord } from './index.js';
import { LmdbStore, REGISTRY_FILE } from './lmdb.js';
import { type RegistryLocation, type RegistryOptions, registryLocation } from './location.js';
import { claimTarget, copyPage, finishCopy, type MigrationMarker } from './migrate.js';
import { withEtcdStore } from './open.js';
import type { RegistrySnapshot, StoreEntry } from './store.js';

export type { BackupHeader } from './backup-file.js';
export { readBackup } from './backup-file.js';

const PAGE = 2000;
/** Puts per LMDB write transaction during a restore. */
const RESTORE_TXN = 5000;

export interface BackupOptions {
  /** The data directory of an LMDB registry (unused for etcd). */
  dataDir?: string;
  registry: RegistryOptions;
  out: string;
}

/**
 * Backs up the registry the options name: a data directory's LMDB (read-only, without its lock,
 * so beside a live KMS) or an etcd cluster prefix (at one revision, without joining the cluster).
 */
export async function backupRegistry(opts: BackupOptions): Promise<BackupHeader> {
  const location = registryLocation(opts.registry);
  if (location.kind === 'lmdb') {
    if (opts.dataDir === undefined)
      throw kmsError('CONFIG_INVALID', 'give the data directory to back up: --data-dir D');
    const dataDir = path.resolve(opts.dataDir);
    const snapshot = LmdbStore.snapshot(dataDir);
    if (snapshot === undefined)
      throw kmsError('CONFIG_INVALID', `${dataDir} holds no KMS registry: nothing to back up`);
    return writeBackup(snapshot, { kind: 'lmdb', dataDir }, opts.out);
  }
  return withEtcdStore(location, opts.registry, async (store) => {
    const snapshot = await store.snapshot();
    return writeBackup(
      snapshot,
      { kind: 'etcd', prefix: location.prefix, revision: snapshot.revision ?? '' },
      opts.out,
    );
  });
}

export interface RestoreReport {
  /** The data directory, or the etcd cluster prefix, restored into. */
  target: string;
  header: BackupHeader;
  /** Records in the restored registry, counted there after the write. */
  counts: BackupHeader['counts'];
}

export interface RestoreOptions {
  inFile: string;
  /** The new data directory of an LMDB registry (unused for etcd). */
  dataDir?: string;
  /** Where to restore: LMDB in `dataDir` (the default) or an empty etcd cluster prefix. */
  registry?: RegistryOptions;
  masterKey: MasterKeyRef;
}

/** Refuses a data directory that already holds a registry or an audit log. */
function assertEmptyTarget(dataDir: string): void {
  const held = [REGISTRY_FILE, AUDIT_FILE_NAME].filter((name) => fs.existsSync(path.join(dataDir, name)));
  if (held.length > 0) {
    throw kmsError(
      'REGISTRY_NOT_EMPTY',
      `${dataDir} already holds ${held.join(' and ')}: restore only into a new or empty data directory`,
    );
  }
}

/**
 * Restores a backup into a new LMDB data directory or an empty etcd cluster prefix; see the module
 * comment for the order of checks.
 */
export async function restoreRegistry(opts: RestoreOptions): Promise<RestoreReport> {
  const location = registryLocation(opts.registry ?? {});
  const inFile = path.resolve(opts.inFile);
  let dataDir: string | undefined;
  if (location.kind === 'lmdb') {
    if (opts.dataDir === undefined) {
      throw kmsError('CONFIG_INVALID', 'give the new data directory to restore into: --data-dir NEW');
    }
    dataDir = path.resolve(opts.dataDir);
    assertEmptyTarget(dataDir);
  }
  const { header, entries } = readBackup(inFile);
  const keks: KekRef[] = entries
    .filter((e) => e.key.startsWith('kek/'))
    .map((e) => {
      const k = e.value as KekRecord;
      return { kekId: k.kekId, version: k.version, wrapped: new Uint8Array(k.wrapped) };
    });
  if (!keks.some((k) => k.version === header.activeKekVersion)) {
    throw corrupt(inFile, `lacks the active KEK version ${header.activeKekVersion}`);
  }
  const kcv = entries.find((e) => e.key === 'meta/kcv')?.value as Uint8Array | undefined;
  await checkMasterKey(opts.masterKey, keks, kcv === undefined ? null : new Uint8Array(kcv), inFile);
  const counts =
    dataDir === undefined
      ? await restoreIntoEtcd(
          location as Extract<RegistryLocation, { kind: 'etcd' }>,
          opts,
          inFile,
          header,
          entries,
        )
      : await restoreIntoDataDir(dataDir, entries);
  if (JSON.stringify(counts) !== JSON.stringify(header.counts)) {
    throw kmsError(
      'STORE_CORRUPT',
      `the restored registry holds ${JSON.stringify(counts)} where the backup holds ${JSON.stringify(header.counts)}`,
    );
  }
  const target = dataDir ?? (location as Extract<RegistryLocation, { kind: 'etcd' }>).prefix;
  return { target, header, counts };
}

async function countsOf(store: Pick<RegistrySnapshot, 'count'>): Promise<BackupHeader['counts']> {
  return {
    keks: await store.count('kek/'),
    deks: await store.count('dek/'),
    threads: await store.count('thread/'),
    pending: await store.count('pending/'),
  };
}

/** Written under a temporary name and renamed into place complete; returns the counts there. */
async function restoreIntoDataDir(dataDir: string, entries: StoreEntry[]): Promise<BackupHeader['counts']> {
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const lock = lockDataDir(dataDir);
  try {
    assertEmptyTarget(dataDir);
    const file = path.join(dataDir, REGISTRY_FILE);
    const tmp = `${file}.restoring`;
    for (const stale of [tmp, `${tmp}-lock`]) fs.rmSync(stale, { force: true });
    const store = LmdbStore.openFile(tmp);
    try {
      for (let i = 0; i < entries.length; i += RESTORE_TXN) {
        await store.transaction({ puts: entries.slice(i, i + RESTORE_TXN) });
      }
    } finally {
      await store.close();
    }
    fs.renameSync(tmp, file);
    fs.rmSync(`${tmp}-lock`, { force: true });
    syncDir(dataDir);
    const restored = LmdbStore.open(dataDir);
    try {
      return await countsOf(restored);
    } finally {
      await restored.close();
    }
  } finally {
    lock.release();
  }
}

/**
 * As `migrate` copies (migrate.ts): a marker naming the backup file claims an empty prefix, the
 * namespaces are copied under it, and the last transaction writes the keyring's meta records and
 * removes the marker; until then replicas refuse the prefix, and the same restore run again
 * finishes an interrupted one.
 */
async function restoreIntoEtcd(
  location: Extract<RegistryLocation, { kind: 'etcd' }>,
  opts: RestoreOptions,
  inFile: string,
  header: BackupHeader,
  entries: StoreEntry[],
): Promise<BackupHeader['counts']> {
  return withEtcdStore(location, opts.registry ?? {}, async (store) => {
    const marker: MigrationMarker = {
      from: inFile,
      kekId: header.kekId,
      host: os.hostname(),
      startedAt: new Date().toISOString(),
    };
    await claimTarget(store, marker, location.prefix, 'restore');
    for (const ns of NAMESPACES) {
      const page = entries.filter((e) => e.key.startsWith(ns));
      for (let i = 0; i < page.length; i += PAGE) await copyPage(store, page.slice(i, i + PAGE));
    }
    const meta = entries.filter((e) => (META as readonly string[]).includes(e.key));
    await finishCopy(store, marker, meta, location.prefix);
    return countsOf(store);
  });
}

/** In a one-off worker: the master key must unwrap the backup's KEK versions (CheckKekTask). */
async function checkMasterKey(
  masterKey: MasterKeyRef,
  keks: KekRef[],
  kcv: Uint8Array | null,
  inFile: string,
): Promise<void> {
  const pool = new Piscina({
    filename: workerFile('crypto'),
    minThreads: 1,
    maxThreads: 1,
    workerData: oneOffWorkerInit(masterKey),
  });
  let check: CheckKekResult;
  try {
    check = await runTask<CheckKekResult>(pool, { type: 'check-kek', keks, kcv });
  } finally {
    await pool.destroy();
  }
  if (!check.ok) {
    throw kmsError(
      'MASTER_KEY_MISMATCH',
      `the master key cannot unwrap the KEK of backup ${inFile}: use the master key of the registry it was taken from. Nothing was restored.`,
    );
  }
}
