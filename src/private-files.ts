/**
 * lmdb-js creates its data and lock files with mode 0664 (fixed in its native code; only the umask
 * narrows it), so a store would be readable by everyone on the machine. LMDB opens files that
 * already exist, and an empty file as a new environment: creating them first, 0600, makes LMDB use
 * ours. Files an older version left with group or other bits are narrowed to 0600.
 */
import fs from 'node:fs';

export function createPrivateFiles(files: readonly string[]): void {
  for (const file of files) {
    const fd = fs.openSync(file, 'a', 0o600);
    try {
      if ((fs.fstatSync(fd).mode & 0o077) !== 0) fs.fchmodSync(fd, 0o600);
    } finally {
      fs.closeSync(fd);
    }
  }
}
