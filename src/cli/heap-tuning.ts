/**
 * V8 heap tuning for our own long-running processes: the daemon (`progressdb-kms serve`) and the
 * server (`progressdb`). The library never calls this: a host's heap is the host's business.
 *
 * Why: V8 counts the ArrayBuffer bytes allocated since the last mark-compact (socket reads,
 * bridge frames, worker task buffers) against the old-generation limit, and it sets that limit
 * from the size of the JS heap, which is small in these processes (~15 MB live). So a busy
 * daemon was running a full mark-compact every ~55 ms (86 in 5 s at ~90k bridge ops/s of 1 KiB),
 * with the concurrent marking threads taking ~3.6 µs of CPU per op. Letting the limit grow
 * further past the live heap takes that to a few per run: +20% bridge throughput on this machine,
 * for ~40 MB more peak RSS (README, "How it stays fast"; 200 gave no measurable gain).
 *
 * V8 reads --heap-growing-percent each time it sets the limit after a GC, so it can be set from
 * inside the running process. --initial-old-space-size worked as well in the A/B, but only on the
 * node command line: Node refuses it in NODE_OPTIONS, and setting it at run time does nothing.
 */
import v8 from 'node:v8';

export const HEAP_GROWING_PERCENT = 400;

/** The V8 flag to apply, or null when the operator chose their own on the node command line. */
export function heapTuningFlag(execArgv: readonly string[]): string | null {
  if (execArgv.some((arg) => arg.replaceAll('_', '-').startsWith('--heap-growing-percent'))) return null;
  return `--heap-growing-percent=${HEAP_GROWING_PERCENT}`;
}

/** Applies the tuning unless the operator set the flag; returns what was applied. */
export function tuneHeapForThroughput(): string | null {
  const flag = heapTuningFlag(process.execArgv);
  if (flag !== null) v8.setFlagsFromString(flag);
  return flag;
}
