/** Parts of the stub Kms objects that the in-process daemon tests hand to startDaemon. */
import type { KmsHealth, RotationStatus } from '../../src/api/index.js';

/** A rotation status with nothing running, on the stub's one KEK version. */
export const IDLE_ROTATION: RotationStatus = {
  state: 'idle',
  kekId: 'kek_stub',
  activeKekVersion: 1,
  targetKekVersion: null,
  done: 0,
  total: 0,
  startedAt: null,
  finishedAt: null,
  kekVersions: [1],
};

/** The stub's health snapshot: `ok` decides readiness. */
export function stubHealth(ok: boolean, queueDepth = 0): KmsHealth {
  return {
    ok,
    mode: 'embedded',
    kekId: 'kek_stub',
    activeKekVersion: 1,
    dekCount: 0,
    poolThreads: 1,
    queueDepth,
    rotation: IDLE_ROTATION,
  };
}
