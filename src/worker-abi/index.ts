/**
 * The worker ABI: what the main thread and the crypto workers exchange (src/kms/pool.ts and
 * workers/crypto.ts). Internal: nothing here is exported by the package.
 */
export * from './batch-result.js';
export * from './batch-task.js';
export * from './errors.js';
export * from './key-directory.js';
export * from './master-key-switch.js';
export * from './slots.js';
export * from './tasks.js';
