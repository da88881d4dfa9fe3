/**
 * Makes the rotation status the daemon reports consistent for pollers. The embedded status can
 * still describe the previous, completed rotation for a moment after a new one was started (its
 * record is written once the new KEK exists), so a client polling "until completed" right after
 * POST /rotate_kek could stop too early. The daemon therefore holds the promise of every rotation
 * it starts or joins, and reports "running" until that promise settles.
 */
import type { Logger } from '../log.js';
import type { Kms, RotationStatus } from '../protocol.js';

export function trackRotations(kms: Kms, logger: Logger): Kms {
  let pending: Promise<RotationStatus> | null = null;

  const rotationStatus = async (): Promise<RotationStatus> => {
    const status = await kms.rotationStatus();
    return pending !== null && status.state !== 'running' ? { ...status, state: 'running' } : status;
  };

  const startKekRotation: Kms['startKekRotation'] = async (ctx) => {
    if (pending === null) {
      const run = kms.rotateKek(ctx).finally(() => {
        if (pending === run) pending = null;
      });
      pending = run;
      run.catch((err: unknown) =>
        logger.error(
          { code: (err as { code?: string }).code },
          'KEK rotation failed; it resumes on the next start',
        ),
      );
    }
    // Let the rotation take its first step, as the embedded startKekRotation does.
    await new Promise((resolve) => setImmediate(resolve));
    return rotationStatus();
  };

  const overrides: Partial<Kms> = { rotationStatus, startKekRotation };
  // Methods of the embedded Kms use private fields, so they are bound to it (once, then cached).
  const bound = new Map<PropertyKey, unknown>();
  return new Proxy(kms, {
    get(target, prop) {
      const override = overrides[prop as keyof Kms];
      if (override) return override;
      let fn = bound.get(prop);
      if (fn === undefined) {
        const value = Reflect.get(target, prop, target);
        if (typeof value !== 'function') return value;
        fn = value.bind(target);
        bound.set(prop, fn);
      }
      return fn;
    },
  });
}
