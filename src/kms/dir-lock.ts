/**
 * One KMS process per data directory. LMDB itself allows several processes, but two KMSs would
 * race on KEK rotation and interleave audit streams; the lock file (holding the owner's pid) stops
 * a second one with DATA_DIR_LOCKED. A lock left by a killed process is taken over once its pid
 * is gone.
 */
import fs from 'node:fs';
import path from 'node:path';
import { kmsError } from '../errors.js';

const LOCK_FILE = 'kms.lock';

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface DirLock {
  release(): void;
}

export function lockDataDir(dataDir: string): DirLock {
  const lockPath = path.join(dataDir, LOCK_FILE);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = fs.openSync(lockPath, 'wx', 0o600);
      fs.writeSync(fd, `${process.pid}\n`);
      fs.closeSync(fd);
      let released = false;
      return {
        release() {
          if (released) return;
          released = true;
          try {
            if (fs.readFileSync(lockPath, 'utf8').trim() === String(process.pid)) fs.unlinkSync(lockPath);
          } catch {
            // Already gone: nothing to release.
          }
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw kmsError('CONFIG_INVALID', `cannot create lock in ${dataDir}: ${(err as Error).message}`);
      }
    }
    let owner = Number.NaN;
    try {
      owner = Number.parseInt(fs.readFileSync(lockPath, 'utf8').trim(), 10);
    } catch {
      continue; // Removed between our open and read: try again.
    }
    if (Number.isInteger(owner) && owner !== process.pid && pidAlive(owner)) {
      throw kmsError('DATA_DIR_LOCKED', `data directory ${dataDir} is in use by process ${owner}`);
    }
    if (owner === process.pid) {
      throw kmsError('DATA_DIR_LOCKED', `data directory ${dataDir} is already open in this process`);
    }
    fs.rmSync(lockPath, { force: true }); // Stale: its owner is gone.
  }
  throw kmsError('DATA_DIR_LOCKED', `could not lock data directory ${dataDir}`);
}
