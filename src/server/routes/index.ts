/** Every endpoint of the server, one file each, in the order the docs list them. */
import { adminEncryptThreads } from './admin-encrypt-threads.js';
import { adminEncryptThreadsStatus } from './admin-encrypt-threads-status.js';
import { adminHealth } from './admin-health.js';
import { adminPendingDeletions } from './admin-pending-deletions.js';
import { adminRekeyMaster } from './admin-rekey-master.js';
import { adminRestoreThread } from './admin-restore-thread.js';
import { adminRotateKek } from './admin-rotate-kek.js';
import { adminRotateThreadDek } from './admin-rotate-thread-dek.js';
import { adminRotationStatus } from './admin-rotation-status.js';
import { adminThreadDekStatus } from './admin-thread-dek-status.js';
import { healthz } from './healthz.js';
import { messagesCreate } from './messages-create.js';
import { messagesDelete } from './messages-delete.js';
import { messagesGet } from './messages-get.js';
import { messagesList } from './messages-list.js';
import { messagesUpdate } from './messages-update.js';
import { metricsRoute } from './metrics.js';
import { openApiRoute } from './openapi.js';
import type { ServerRoute } from './route.js';
import { threadsCreate } from './threads-create.js';
import { threadsDelete } from './threads-delete.js';
import { threadsGet } from './threads-get.js';
import { threadsList } from './threads-list.js';

export const ROUTES: readonly ServerRoute[] = [
  healthz,
  metricsRoute,
  openApiRoute(() => ROUTES),
  threadsCreate,
  threadsList,
  threadsGet,
  threadsDelete,
  messagesCreate,
  messagesList,
  messagesGet,
  messagesUpdate,
  messagesDelete,
  adminRotateKek,
  adminRekeyMaster,
  adminRotationStatus,
  adminRotateThreadDek,
  adminThreadDekStatus,
  adminEncryptThreads,
  adminEncryptThreadsStatus,
  adminPendingDeletions,
  adminRestoreThread,
  adminHealth,
];
