/**
 * Progress of a long offline command (rotate, migrate) on stderr: on a terminal one line redrawn
 * in place with a bar, the rate and the time left; otherwise (a log, a pipe) a plain line every
 * few seconds and one at the end, so a job runner's log shows it is alive.
 */

const BAR_WIDTH = 30;
const PLAIN_EVERY_MS = 5000;

export interface ProgressOptions {
  /** What is counted, e.g. "keys" or "records". */
  unit: string;
  tty?: boolean;
  write?: (text: string) => void;
  now?: () => number;
}

function duration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

export class Progress {
  readonly #unit: string;
  readonly #tty: boolean;
  readonly #write: (text: string) => void;
  readonly #now: () => number;
  readonly #start: number;
  #lastPlain = 0;
  #drawn = false;

  constructor(opts: ProgressOptions) {
    this.#unit = opts.unit;
    this.#tty = opts.tty ?? process.stderr.isTTY === true;
    this.#write = opts.write ?? ((text) => process.stderr.write(text));
    this.#now = opts.now ?? (() => Date.now());
    this.#start = this.#now();
  }

  /** The line for `done` of `total`: counts, percentage, rate and (while unfinished) time left. */
  line(done: number, total: number): string {
    const elapsed = (this.#now() - this.#start) / 1000;
    const rate = elapsed > 0 ? done / elapsed : 0;
    const ratio = total === 0 ? 1 : Math.min(1, done / total);
    const left = rate > 0 ? (total - done) / rate : Number.POSITIVE_INFINITY;
    const eta = done >= total ? `in ${duration(elapsed)}` : `${duration(left)} left`;
    return `${done}/${total} ${this.#unit} (${(ratio * 100).toFixed(1)}%), ${Math.round(rate)}/s, ${eta}`;
  }

  update(done: number, total: number): void {
    const text = this.line(done, total);
    if (this.#tty) {
      const filled = Math.round((total === 0 ? 1 : Math.min(1, done / total)) * BAR_WIDTH);
      this.#write(`\r[${'#'.repeat(filled)}${'.'.repeat(BAR_WIDTH - filled)}] ${text}\x1b[K`);
      this.#drawn = true;
      return;
    }
    const now = this.#now();
    if (now - this.#lastPlain >= PLAIN_EVERY_MS || done >= total) {
      this.#lastPlain = now;
      this.#write(`${text}\n`);
    }
  }

  /** Ends the redrawn line on a terminal. */
  end(): void {
    if (this.#drawn) this.#write('\n');
    this.#drawn = false;
  }
}
