/**
 * Plumbing for tests and benchmarks that run the real executables as child processes: a clean
 * environment, a free loopback port, and a deadline-bound poll. Benchmarks import nothing from
 * test/, so it lives here and test/helpers/processes.ts re-exports it; it imports no test
 * framework and is not part of the package.
 */
import { createServer } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';

/** The parent's environment without any PROGRESSDB_* setting, plus `extra`. */
export function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('PROGRESSDB_')) env[k] = v;
  return { ...env, ...extra };
}

/** A loopback port that was free a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

/** Polls `check` until it returns a value other than undefined, or fails after `ms`. */
export async function until<T>(
  what: string,
  check: () => Promise<T | undefined> | T | undefined,
  ms = 15_000,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(20);
  }
}
