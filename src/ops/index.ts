/**
 * The operation catalogue: every KMS operation, one file each. The bridge codec, the bridge
 * server's dispatch, the daemon's HTTP routes, the remote client's HTTP calls and retry rule and
 * the metrics labels are all derived from this list. Adding an operation = a new file + one line.
 */
import { cancelDeletion } from './cancel-deletion.js';
import { createDekForThread } from './create-dek-for-thread.js';
import { decrypt } from './decrypt.js';
import { destroyDek } from './destroy-dek.js';
import { destroyDekVersionsBefore } from './destroy-dek-versions-before.js';
import { encrypt } from './encrypt.js';
import { getWrapped } from './get-wrapped.js';
import { health } from './health.js';
import type { AnyOp, RequestOf } from './op.js';
import { reencrypt } from './reencrypt.js';
import { reencryptBatch } from './reencrypt-batch.js';
import { rewrap } from './rewrap.js';
import { rotateDek } from './rotate-dek.js';
import { rotateKek } from './rotate-kek.js';
import { rotationStatus } from './rotation-status.js';

/** In the order the docs list them. */
export const OPS = [
  health,
  createDekForThread,
  getWrapped,
  encrypt,
  decrypt,
  reencrypt,
  reencryptBatch,
  rewrap,
  rotateDek,
  destroyDek,
  cancelDeletion,
  destroyDekVersionsBefore,
  rotateKek,
  rotationStatus,
] as const;

export type KmsOpSpec = (typeof OPS)[number];
export type KmsOp = KmsOpSpec['name'];
/** One typed request: the op's name and its parameters (what the remote transports carry). */
export type KmsRequest = RequestOf<KmsOpSpec>;

function byName(): { readonly [N in KmsOp]: Extract<KmsOpSpec, { name: N }> } {
  const out: Record<string, AnyOp> = {};
  for (const op of OPS) {
    if (Object.hasOwn(out, op.name)) throw new Error(`two operations are named ${op.name}`);
    out[op.name] = op;
  }
  return out as { readonly [N in KmsOp]: Extract<KmsOpSpec, { name: N }> };
}

function byCode(): ReadonlyMap<number, KmsOpSpec> {
  const out = new Map<number, KmsOpSpec>();
  for (const op of OPS) {
    if (out.has(op.code)) throw new Error(`operations ${out.get(op.code)?.name} and ${op.name} share a code`);
    out.set(op.code, op);
  }
  return out;
}

export const OP_BY_NAME = byName();
export const OP_BY_CODE = byCode();

/** Bridge op codes by name. */
export const OP_CODES = Object.fromEntries(OPS.map((op) => [op.name, op.code])) as {
  readonly [N in KmsOp]: number;
};

/** Operations whose repetition has no further effect: safe to retry after an unknown outcome. */
export const IDEMPOTENT_OPS: ReadonlySet<KmsOp> = new Set(
  OPS.filter((op) => op.idempotent).map((op) => op.name),
);

/** Operations the remote client may repeat after an unknown outcome: idempotent or storing nothing. */
export const REPEATABLE_OPS: ReadonlySet<KmsOp> = new Set(
  OPS.filter((op) => op.idempotent || op.repeatable === true).map((op) => op.name),
);

/** The spec of a request's op, typed loosely for the generic consumers (codec, routes, clients). */
export function opOf(name: KmsOp): AnyOp {
  return OP_BY_NAME[name];
}

/** An op's metrics label. */
export function labelOf(op: AnyOp): string {
  return op.label ?? op.name;
}
