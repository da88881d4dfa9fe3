/**
 * The index of keys pending deletion (destroyDek within a deletion window):
 * `pending/<due time in ms, 16 digits>/<keyId>` → keyId. Both stores range a namespace in key
 * order, so it lists soonest due first and the deletion sweep reads only what is due. The
 * registry keeps it in the same transaction as the DEK record it indexes.
 */
import { type DekRecord, deletionDueMs } from '../dek-versions.js';
import type { StoreEntry, StoreTxnView } from './store.js';

export const PENDING_PREFIX = 'pending/';
const DUE_DIGITS = 16;

/** The index entry of a record, if it is pending deletion. */
function pendingKey(record: DekRecord): string | undefined {
  const due = deletionDueMs(record);
  return due === null
    ? undefined
    : `${PENDING_PREFIX}${String(due).padStart(DUE_DIGITS, '0')}/${record.keyId}`;
}

/** Inside the transaction that replaces `current` by `next`: the index follows. */
export function followPendingIndex(tx: StoreTxnView, current: DekRecord, next: DekRecord): void {
  const [was, is] = [pendingKey(current), pendingKey(next)];
  if (was === is) return;
  if (was !== undefined) tx.delete(was);
  if (is !== undefined) tx.put(is, next.keyId);
}

/** The key ids of a page of the index that are due by `nowMs`, in order. */
export function dueKeyIds(page: readonly StoreEntry[], nowMs: number): string[] {
  const due: string[] = [];
  for (const { key, value } of page) {
    if (Number(key.slice(PENDING_PREFIX.length, PENDING_PREFIX.length + DUE_DIGITS)) > nowMs) break;
    due.push(value as string);
  }
  return due;
}
