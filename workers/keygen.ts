/**
 * One-shot worker task that creates a master key: 32 random bytes, written as hex to a new file
 * with mode 0600 (never overwriting one), or to stdout when no file is given. Runs in a worker so
 * that even a process that creates its own development key never holds it on the main thread.
 */
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';

export default function generateMasterKey({ out }: { out: string | null }): { ok: boolean; code?: string } {
  const key = Buffer.alloc(32);
  const hex = Buffer.alloc(65);
  try {
    randomFillSync(key);
    hex.write(`${key.toString('hex')}\n`, 'latin1');
    if (out === null) {
      fs.writeSync(1, hex);
      return { ok: true };
    }
    const fd = fs.openSync(out, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    try {
      fs.writeSync(fd, hex);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    return { ok: true };
  } catch (err) {
    return { ok: false, code: (err as NodeJS.ErrnoException).code ?? 'error' };
  } finally {
    key.fill(0);
    hex.fill(0);
  }
}
