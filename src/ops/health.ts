/** health: the KMS health snapshot (authenticated; the daemon's /healthz is the bare probe). */
import type { KeyMemoryStatus, KmsHealth, ReplicaStatus } from '../api/index.js';
import { bool, type Field, nested, nullable, optional, record, text, uint } from './fields.js';
import { singleOp } from './op.js';
import { noParamsBinary, noParamsRecord, rotationStatusBinary, rotationStatusRecord } from './shapes.js';

/** Written by the daemon; a client only ever hears it from a daemon, so it reads 'external'. */
const mode: Field<KmsHealth['mode']> = {
  name: 'mode',
  optional: false,
  type: { oneOf: ['embedded', 'external'] },
  write: (v) => v,
  read: () => 'external',
};

const keyMemoryRecord = record<KeyMemoryStatus>({
  lockedBytes: uint('locked_bytes'),
  unlockedBytes: uint('unlocked_bytes'),
});

const replicaStatusRecord = record<ReplicaStatus>({
  replicaId: text('replica_id'),
  serving: bool('serving'),
  servingUntil: nullable(text('serving_until')),
  leaseTtlSeconds: uint('lease_ttl_seconds'),
  reason: nullable(text('reason')),
});

export const health = singleOp({
  name: 'health',
  code: 0x0c,
  idempotent: true,
  http: {
    method: 'GET',
    path: '/health',
    help: '→ {"ok","kek_id","active_kek_version","dek_count","pool_threads","queue_depth","rotation":{...},"next_rotation_due_at" (with a rotation period),"replica":{...} (a cluster replica),"key_memory":{"locked_bytes","unlocked_bytes"}}',
  },
  json: {
    request: noParamsRecord,
    result: record<KmsHealth>({
      ok: bool('ok'),
      mode,
      kekId: text('kek_id'),
      activeKekVersion: uint('active_kek_version'),
      dekCount: uint('dek_count'),
      poolThreads: uint('pool_threads'),
      queueDepth: uint('queue_depth'),
      rotation: nested('rotation', rotationStatusRecord),
      nextRotationDueAt: optional(nullable(text('next_rotation_due_at'))),
      replica: optional(nested('replica', replicaStatusRecord)),
      keyMemory: optional(nested('key_memory', keyMemoryRecord)),
    }),
  },
  // The bridge's health carries no replica part (`ok` already says whether a replica serves), no
  // rotation due time and no key memory (the daemon's /health and metrics do).
  binary: {
    request: noParamsBinary('health'),
    result: {
      write: (w, h) => {
        w.u8(h.ok ? 1 : 0)
          .str(h.kekId)
          .u32(h.activeKekVersion)
          .f64(h.dekCount)
          .u32(h.poolThreads)
          .f64(h.queueDepth);
        rotationStatusBinary.write(w, h.rotation);
      },
      read: (r): KmsHealth => ({
        ok: r.u8() === 1,
        mode: 'external',
        kekId: r.str(),
        activeKekVersion: r.u32(),
        dekCount: r.f64(),
        poolThreads: r.u32(),
        queueDepth: r.f64(),
        rotation: rotationStatusBinary.read(r),
      }),
    },
  },
  run: (kms) => kms.health(),
});
