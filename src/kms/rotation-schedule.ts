/**
 * Scheduled KEK rotation (like AWS KMS automatic rotation or Vault's auto_rotate_period): when
 * the active KEK version is older than the period, a rotation starts by itself. In a cluster every
 * replica checks, and the rotation lock lets one rotate; the start names the version it found
 * too old, so a replica that looked just before another finished does not rotate a second time.
 */
import { kmsError } from '../errors.js';
import type { Logger } from '../log.js';
import type { Registry } from './registry/index.js';

const UNITS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
  w: 7 * 86_400_000,
};

/** `90d`, `12h`, `30m`, `45s`, `500ms` or `2w` → milliseconds; CONFIG_INVALID otherwise. */
export function parseDuration(text: string, what: string): number {
  const match = /^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$/.exec(text);
  const ms = match ? Number(match[1]) * (UNITS[match[2] as string] as number) : Number.NaN;
  if (!Number.isSafeInteger(ms) || ms <= 0) {
    throw kmsError(
      'CONFIG_INVALID',
      `${what} must be a positive duration such as 90d, 12h or 30m, got "${text}"`,
    );
  }
  return ms;
}

/** Time as the schedule sees it; tests inject theirs. */
export interface KmsClock {
  now(): number;
  /** How often the schedule looks at the active KEK's age. Default: a minute (less for short periods). */
  checkEveryMs?: number;
}

export const SYSTEM_CLOCK: KmsClock = { now: () => Date.now() };

export interface ScheduleDeps {
  periodMs: number;
  clock: KmsClock;
  /** The active KEK version and when it was made, as the registry holds them now. */
  activeKek(): { version: number; createdAt: string } | undefined;
  /** Starts a rotation unless the active version is no longer `version`; resolves when done. */
  rotate(version: number): Promise<unknown>;
  log: Logger;
}

/** ScheduleDeps.activeKek over a registry. */
export function activeKekOf(registry: Registry): ScheduleDeps['activeKek'] {
  return () => {
    const meta = registry.kekMeta();
    const record = meta === undefined ? undefined : registry.kek(meta.activeVersion);
    return record === undefined ? undefined : { version: record.version, createdAt: record.createdAt };
  };
}

export class RotationSchedule {
  readonly #deps: ScheduleDeps;
  #timer: NodeJS.Timeout | null = null;
  #busy = false;

  constructor(deps: ScheduleDeps) {
    this.#deps = deps;
  }

  /** When the active KEK version falls due (ISO time), or null when the registry has none. */
  nextDueAt(): string | null {
    const due = this.#dueAtMs(this.#deps.activeKek());
    return due === null ? null : new Date(due).toISOString();
  }

  #dueAtMs(active: { createdAt: string } | undefined): number | null {
    if (active === undefined) return null;
    const made = Date.parse(active.createdAt);
    return Number.isFinite(made) ? made + this.#deps.periodMs : null;
  }

  start(): void {
    const every = this.#deps.clock.checkEveryMs ?? Math.min(60_000, Math.max(1000, this.#deps.periodMs / 10));
    this.#timer = setInterval(() => this.check(), every);
    this.#timer.unref();
    this.check();
  }

  stop(): void {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
  }

  /** Starts the rotation if the active KEK is due and none was started by this check already. */
  check(): void {
    if (this.#busy) return;
    const active = this.#deps.activeKek();
    const due = this.#dueAtMs(active);
    if (active === undefined || due === null || this.#deps.clock.now() < due) return;
    this.#busy = true;
    this.#deps.log.info({ kekVersion: active.version }, 'the active KEK is due for rotation: rotating');
    this.#deps
      .rotate(active.version)
      .catch((err: { code?: string; message?: string }) => {
        this.#deps.log.error({ code: err.code }, `scheduled KEK rotation failed; retried at the next check`);
      })
      .finally(() => {
        this.#busy = false;
      });
  }
}
