/**
 * Backup and restore of a registry: wrapped material only, so a backup file is as safe to keep as
 * the registry itself (useless without the master key, which is kept apart).
 *
 * A backup is a consistent snapshot (store.ts RegistrySnapshot: LMDB in one read transaction, etcd
 * at one revision), taken while the KMS serves. The file is JSON lines:
 *
 *   {"format":"progressdb-kms-backup","version":1,...}   header: what it holds, readable by `head -1`
 *   {"k":"meta/kek","v":"<base64>"}                      one record a line
 *   ...
 *   {"sha256":"<hex>"}                                    trailer: over every byte before it
 *
 * Why this shape: the header and the keys can be read with ordinary tools; each value is the
 * msgpack bytes the etcd store writes (plain maps, no record extension), in base64, so byte arrays
 * stay byte arrays (JSON would turn them into number arrays) and any msgpack decoder reads them.
 * A missing trailer says truncated, a wrong hash says damaged; both are STORE_CORRUPT. The audit
 * head is not backed up (it describes one data directory's own log), nor a migration marker.
 *
 * Restore checks everything before it writes anything: the trailer and checksum, the header
 * against the records, then in a worker that the master key unwraps the backup's KEK (the key
 * check value, CheckKekTask): a wrong key is MASTER_KEY_MISMATCH. The LMDB registry is written
 * under a temporary name and renamed into place complete, so an interrupted restore leaves no
 * registry behind; into etcd it copies as `migrate` does, under a marker (migrate.ts).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Packr } from 'msgpackr';
import { Piscina } from 'piscina';
import { kmsError } from '../../errors.js';
import type { CheckKekResult, KekRef, MasterKeyRef } from '../../worker-abi/index.js';
import { AUDIT_FILE_NAME } from '../audit-file.js';
import { lockDataDir } from '../dir-lock.js';
import { runTask, workerFile } from '../pool.js';
import { oneOffWorkerInit } from '../verify-audit.js';
import type { KekMeta, KekRecord, RotationRecord } from './index.js';
import { MIGRATING } from './index.js';
import { LmdbStore, REGISTRY_FILE } from './lmdb.js';
import { type RegistryLocation, type RegistryOptions, registryLocation } from './location.js';
import { claimTarget, copyPage, finishCopy, type MigrationMarker } from './migrate.js';
import { etcdClientOptions } from './open.js';
import type { RegistrySnapshot, StoreEntry } from './store.js';

export const BACKUP_FORMAT = 'progressdb-kms-backup';
const BACKUP_VERSION = 1;
/** Single records, backed up first; then the namespaces, in this order. */
const META = ['meta/format', 'meta/kcv', 'meta/kek', 'rotation'] as const;
const NAMESPACES = ['kek/', 'dek/', 'thread/'] as const;
type Namespace = (typeof NAMESPACES)[number];
const PAGE = 2000;
/** Puts per LMDB write transaction during a restore. */
const RESTORE_TXN = 5000;

/** Same encoding as the etcd store's values (etcd.ts). */
const packr = new Packr({ useRecords: false, moreTypes: false });

export type BackupSource =
  | { kind: 'lmdb'; dataDir: string }
  | { kind: 'etcd'; prefix: string; revision: string };

export interface BackupHeader {
  format: typeof BACKUP_FORMAT;
  version: number;
  createdAt: string;
  source: BackupSource;
  kekId: string;
  kekVersions: number[];
  activeKekVersion: number;
  /** The rotation record's state, if any: a backup taken mid-rotation resumes it once restored. */
  rotation: RotationRecord['state'] | null;
  counts: { keks: number; deks: number; threads: number };
  /** Record lines between the header and the trailer. */
  records: number;
}

const COUNT_FIELD: Record<Namespace, keyof BackupHeader['counts']> = {
  'kek/': 'keks',
  'dek/': 'deks',
  'thread/': 'threads',
};

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
  const [{ Etcd3 }, { EtcdStore }] = await Promise.all([import('etcd3'), import('./etcd.js')]);
  const client = new Etcd3(etcdClientOptions(location, opts.registry));
  let store: Awaited<ReturnType<typeof EtcdStore.open>> | undefined;
  try {
    store = await EtcdStore.open({ client, prefix: location.prefix, onClose: () => client.close() });
    const snapshot = await store.snapshot();
    return await writeBackup(
      snapshot,
      { kind: 'etcd', prefix: location.prefix, revision: snapshot.revision ?? '' },
      opts.out,
    );
  } finally {
    if (store) await store.close();
    else client.close();
  }
}

/**
 * Writes `snapshot` to `out`: mode 0600, through a temporary file in the same directory renamed
 * over `out` once complete and synced, so `out` is never a partial backup. Closes the snapshot.
 */
export async function writeBackup(
  snapshot: RegistrySnapshot,
  source: BackupSource,
  out: string,
): Promise<BackupHeader> {
  const target = path.resolve(out);
  const tmp = `${target}.tmp-${process.pid}`;
  let fd: number | undefined;
  try {
    if ((await snapshot.get(MIGRATING)) !== undefined) {
      throw kmsError('REGISTRY_MIGRATING', 'the registry is being migrated into: finish the migration first');
    }
    const kekMeta = (await snapshot.get('meta/kek')) as KekMeta | undefined;
    if (kekMeta === undefined)
      throw kmsError('CONFIG_INVALID', 'the registry holds no keyring: nothing to back up');
    const meta: StoreEntry[] = [];
    for (const key of META) {
      const value = await snapshot.get(key);
      if (value !== undefined) meta.push({ key, value });
    }
    const keks = await snapshot.range('kek/');
    const counts = {
      keks: keks.length,
      deks: await snapshot.count('dek/'),
      threads: await snapshot.count('thread/'),
    };
    const rotation = (await snapshot.get('rotation')) as RotationRecord | undefined;
    const header: BackupHeader = {
      format: BACKUP_FORMAT,
      version: BACKUP_VERSION,
      createdAt: new Date().toISOString(),
      source,
      kekId: kekMeta.kekId,
      kekVersions: keks.map((e) => (e.value as KekRecord).version),
      activeKekVersion: kekMeta.activeVersion,
      rotation: rotation?.state ?? null,
      counts,
      records: meta.length + counts.keks + counts.deks + counts.threads,
    };
    fs.rmSync(tmp, { force: true });
    const file = fs.openSync(tmp, 'wx', 0o600);
    fd = file;
    const hash = createHash('sha256');
    const write = (text: string) => {
      const bytes = Buffer.from(text);
      hash.update(bytes);
      fs.writeSync(file, bytes);
    };
    const writeEntries = (entries: StoreEntry[]) => {
      write(
        entries
          .map((e) => `${JSON.stringify({ k: e.key, v: packr.pack(e.value).toString('base64') })}\n`)
          .join(''),
      );
    };
    write(`${JSON.stringify(header)}\n`);
    writeEntries(meta);
    writeEntries(keks);
    for (const ns of ['dek/', 'thread/'] as const) {
      let written = 0;
      let after: string | undefined;
      for (;;) {
        const page = await snapshot.range(ns, after === undefined ? { limit: PAGE } : { after, limit: PAGE });
        if (page.length === 0) break;
        writeEntries(page);
        written += page.length;
        after = (page[page.length - 1] as StoreEntry).key;
      }
      if (written !== counts[COUNT_FIELD[ns]]) {
        throw kmsError(
          'INTERNAL',
          `the snapshot counted ${counts[COUNT_FIELD[ns]]} records under ${ns} but listed ${written}`,
        );
      }
    }
    fs.writeSync(file, `${JSON.stringify({ sha256: hash.digest('hex') })}\n`);
    fs.fsyncSync(file);
    fs.closeSync(file);
    fd = undefined;
    fs.renameSync(tmp, target);
    syncDir(path.dirname(target));
    return header;
  } catch (err) {
    if (fd !== undefined) fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw err;
  } finally {
    await snapshot.close();
  }
}

function syncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export interface ParsedBackup {
  header: BackupHeader;
  entries: StoreEntry[];
}

function corrupt(file: string, why: string): Error {
  return kmsError('STORE_CORRUPT', `backup ${file} ${why}; nothing was restored`);
}

/** Reads and checks a backup file: trailer, checksum, header, records against the header. */
export function readBackup(file: string): ParsedBackup {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (err) {
    throw kmsError('CONFIG_INVALID', `cannot read backup ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
  const truncated = 'has no checksum trailer: it is truncated (or not a backup)';
  if (bytes.length === 0 || bytes[bytes.length - 1] !== 0x0a) throw corrupt(file, truncated);
  const trailerStart = bytes.lastIndexOf(0x0a, bytes.length - 2) + 1;
  let trailer: { sha256?: unknown };
  try {
    trailer = JSON.parse(bytes.subarray(trailerStart).toString('utf8'));
  } catch {
    throw corrupt(file, truncated);
  }
  if (typeof trailer?.sha256 !== 'string') throw corrupt(file, truncated);
  const body = bytes.subarray(0, trailerStart);
  const actual = createHash('sha256').update(body).digest('hex');
  if (actual !== trailer.sha256) {
    throw corrupt(
      file,
      `fails its SHA-256 checksum (damaged or changed after it was written: ${actual} != ${trailer.sha256})`,
    );
  }
  const lines = body.toString('utf8').split('\n');
  lines.pop(); // the body ends in a newline
  let header: BackupHeader;
  try {
    header = JSON.parse(lines[0] ?? '') as BackupHeader;
  } catch {
    throw corrupt(file, 'has no readable header line');
  }
  if (header?.format !== BACKUP_FORMAT) throw corrupt(file, 'is not a progressdb-kms backup');
  if (header.version !== BACKUP_VERSION) {
    throw kmsError(
      'CONFIG_INVALID',
      `backup ${file} has format version ${header.version}, which this version cannot read`,
    );
  }
  const entries: StoreEntry[] = [];
  for (const line of lines.slice(1)) {
    const record = JSON.parse(line) as { k: string; v: string };
    entries.push({ key: record.k, value: packr.unpack(Buffer.from(record.v, 'base64')) });
  }
  const counted = { keks: 0, deks: 0, threads: 0 };
  for (const { key } of entries) {
    const ns = NAMESPACES.find((n) => key.startsWith(n));
    if (ns !== undefined) counted[COUNT_FIELD[ns]]++;
    else if (!(META as readonly string[]).includes(key)) throw corrupt(file, `holds an unknown key ${key}`);
  }
  if (
    entries.length !== header.records ||
    counted.keks !== header.counts.keks ||
    counted.deks !== header.counts.deks ||
    counted.threads !== header.counts.threads
  ) {
    throw corrupt(
      file,
      `holds ${JSON.stringify(counted)} records where its header says ${JSON.stringify(header.counts)}`,
    );
  }
  return { header, entries };
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
  const [{ Etcd3 }, { EtcdStore }] = await Promise.all([import('etcd3'), import('./etcd.js')]);
  const client = new Etcd3(etcdClientOptions(location, opts.registry ?? {}));
  let store: Awaited<ReturnType<typeof EtcdStore.open>> | undefined;
  try {
    store = await EtcdStore.open({ client, prefix: location.prefix, onClose: () => client.close() });
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
    return await countsOf(store);
  } finally {
    if (store) await store.close();
    else client.close();
  }
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
