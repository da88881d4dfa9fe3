/**
 * The backup file (backup.ts makes and restores them). JSON lines:
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
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Packr } from 'msgpackr';
import { kmsError } from '../../errors.js';
import type { KekMeta, KekRecord, RotationRecord } from './index.js';
import { MIGRATING } from './index.js';
import type { RegistrySnapshot, StoreEntry } from './store.js';

export const BACKUP_FORMAT = 'progressdb-kms-backup';
const BACKUP_VERSION = 1;
/** Single records, backed up first; then the namespaces, in this order. */
export const META = ['meta/format', 'meta/kcv', 'meta/kek', 'rotation', 'meta/audit-keys'] as const;
export const NAMESPACES = ['kek/', 'dek/', 'thread/', 'pending/'] as const;
type Namespace = (typeof NAMESPACES)[number];
const PAGE = 2000;

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
  /** `pending`: keys pending deletion (absent from backups made before the deletion window). */
  counts: { keks: number; deks: number; threads: number; pending: number };
  /** Record lines between the header and the trailer. */
  records: number;
}

const COUNT_FIELD: Record<Namespace, keyof BackupHeader['counts']> = {
  'kek/': 'keks',
  'dek/': 'deks',
  'thread/': 'threads',
  'pending/': 'pending',
};

/** The header of a backup of `snapshot`, with the records it holds besides the DEKs and threads. */
async function headOf(
  snapshot: RegistrySnapshot,
  source: BackupSource,
): Promise<{ header: BackupHeader; meta: StoreEntry[]; keks: StoreEntry[] }> {
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
    pending: await snapshot.count('pending/'),
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
    records: meta.length + counts.keks + counts.deks + counts.threads + counts.pending,
  };
  return { header, meta, keks };
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
    const { header, meta, keks } = await headOf(snapshot, source);
    const { counts } = header;
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
    for (const ns of ['dek/', 'thread/', 'pending/'] as const) {
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

export function syncDir(dir: string): void {
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

export function corrupt(file: string, why: string): Error {
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
  header.counts = { ...header.counts, pending: header.counts.pending ?? 0 };
  const counted = { keks: 0, deks: 0, threads: 0, pending: 0 };
  for (const { key } of entries) {
    const ns = NAMESPACES.find((n) => key.startsWith(n));
    if (ns !== undefined) counted[COUNT_FIELD[ns]]++;
    else if (!(META as readonly string[]).includes(key)) throw corrupt(file, `holds an unknown key ${key}`);
  }
  if (
    entries.length !== header.records ||
    counted.keks !== header.counts.keks ||
    counted.deks !== header.counts.deks ||
    counted.threads !== header.counts.threads ||
    counted.pending !== header.counts.pending
  ) {
    throw corrupt(
      file,
      `holds ${JSON.stringify(counted)} records where its header says ${JSON.stringify(header.counts)}`,
    );
  }
  return { header, entries };
}
