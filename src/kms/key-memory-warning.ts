/** The operator's warning when the system refuses to lock the workers' key memory. */
import type { Logger } from '../log.js';
import type { KeyMemoryReport } from '../worker-abi/index.js';

/** A report handler that warns once per KMS, not once per worker, when key memory is not locked. */
export function keyMemoryWarner(log: Logger): (report: KeyMemoryReport) => void {
  let warned = false;
  return (report) => {
    if (report.unlockedBytes === 0 || warned) return;
    warned = true;
    const limit =
      report.memlockLimitBytes === null ? 'unknown' : `${Math.floor(report.memlockLimitBytes / 1024)} KiB`;
    log.warn(
      `key memory is NOT locked: the system refused to mlock ${report.unlockedBytes} bytes of a crypto ` +
        `worker's key slots (RLIMIT_MEMLOCK ${limit}). Keys stay in guarded memory but may be swapped ` +
        'to disk. Raise the limit (systemd: LimitMEMLOCK=; shell: ulimit -l; docker: --ulimit memlock=) ' +
        'to at least 32 bytes x (dek_cache_size + 1024) x pool_size, or lower dek_cache_size.',
    );
  };
}
