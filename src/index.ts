/** Public entry of the `progressdb` package: the KMS as a library, its errors and protocol types. */
export { createKms } from './kms/index.js';
export type { KmsOptions } from './kms/options.js';
export * from './errors.js';
export type * from './protocol.js';
