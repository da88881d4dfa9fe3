/** create_dek_for_thread: the thread's DEK, created on first call (retries and races never make two). */
import { id, record } from './fields.js';
import { singleOp } from './op.js';
import { dekInfoBinary, dekInfoRecord } from './shapes.js';

export interface ThreadParams {
  threadId: string;
}

export const createDekForThread = singleOp({
  name: 'create_dek_for_thread',
  code: 0x01,
  idempotent: true,
  http: {
    method: 'POST',
    path: '/create_dek_for_thread',
    help: '{"thread_id"} → {"key_id","wrapped","kek_id","kek_version","key_version","thread_id","created_at"}',
    strict: true,
  },
  json: { request: record<ThreadParams>({ threadId: id('thread_id') }), result: dekInfoRecord },
  binary: {
    request: {
      write: (w, p: ThreadParams) => void w.str(p.threadId),
      read: (r) => ({ op: 'create_dek_for_thread', threadId: r.str() }),
    },
    result: dekInfoBinary,
  },
  run: (kms, p, ctx) => kms.createDekForThread(p.threadId, ctx),
});
