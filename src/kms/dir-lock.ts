/**
 * One KMS process per data directory. LMDB itself allows several processes (its lock file is a
 * reader table, not an exclusive lock), but two KMSs would race on KEK rotation and interleave
 * audit streams; an exclusive flock(2) on `kms.lock`, held on an fd kept open for the KMS's
 * lifetime, stops a second one with DATA_DIR_LOCKED.
 *
 * The kernel drops the lock when the holder's last fd closes, so a process that died (kill -9,
 * OOM, a container restart where the new process is PID 1 again) never blocks the next start,
 * whatever pid the file still names. The pid written into the file is for operators only and is
 * never trusted. The file is never removed: unlinking a lock file that another process has open
 * lets two processes each lock a different inode.
 */
import fs from 'node:fs';
import path from 'node:path';
import { flockSync } from 'fs-ext';
import { kmsError } from '../errors.js';

const LOCK_FILE = 'kms.lock';

/**
 * Data directories locked by this process. flock(2) would refuse a second open file description
 * in the same process too, but flock is emulated with per-process fcntl locks on some file
 * systems (NFS), where a second open here would succeed; and this gives the clearer message.
 */
const lockedHere = new Set<string>();

export interface DirLock {
  release(): void;
}

function describeHolder(lockPath: string): string {
  try {
    const pid = fs.readFileSync(lockPath, 'latin1').trim();
    return /^\d{1,10}$/.test(pid) ? ` (by process ${pid}, as written in ${LOCK_FILE})` : '';
  } catch {
    return '';
  }
}

export function lockDataDir(dataDir: string): DirLock {
  let dir: string;
  try {
    dir = fs.realpathSync(dataDir);
  } catch (err) {
    throw kmsError('CONFIG_INVALID', `cannot open data directory ${dataDir}: ${(err as Error).message}`);
  }
  if (lockedHere.has(dir)) {
    throw kmsError('DATA_DIR_LOCKED', `data directory ${dataDir} is already open in this process`);
  }
  const lockPath = path.join(dir, LOCK_FILE);
  let fd: number;
  try {
    // No O_TRUNC: the file may be another process's live lock. libuv opens it close-on-exec, so
    // child processes never inherit (and keep holding) the lock.
    fd = fs.openSync(lockPath, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
  } catch (err) {
    throw kmsError('CONFIG_INVALID', `cannot create lock in ${dataDir}: ${(err as Error).message}`);
  }
  try {
    flockSync(fd, 'exnb');
  } catch (err) {
    fs.closeSync(fd);
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EAGAIN' || code === 'EWOULDBLOCK') {
      throw kmsError('DATA_DIR_LOCKED', `data directory ${dataDir} is in use${describeHolder(lockPath)}`);
    }
    throw kmsError('CONFIG_INVALID', `cannot lock data directory ${dataDir}: ${(err as Error).message}`);
  }
  lockedHere.add(dir);
  try {
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
  } catch {
    // The pid is informational; the flock is the lock.
  }
  let released = false;
  return {
    release() {
      if (released) return;
      released = true;
      try {
        fs.ftruncateSync(fd, 0);
      } catch {
        // Informational content only.
      }
      fs.closeSync(fd); // Drops the flock.
      lockedHere.delete(dir);
    },
  };
}
