/** The public library surface: the `Kms` interface, its results and its errors. */
export * from './errors.js';
export type * from './kms.js';
