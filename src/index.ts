/**
 * Public entry of the `progressdb` package: the KMS as a library (src/api: `Kms`, its results and
 * errors), its factories, options and key generation. The worker ABI is internal and not exported.
 */

export * from './api/index.js';
export type { KmsOptions } from './config/library.js';
export type { EmbeddedKmsHandle } from './kms/index.js';
export {
  createKms,
  generateMasterKey,
  generateMasterKeyFile,
  MAX_AAD_BYTES,
  MAX_PLAINTEXT_BYTES,
} from './kms/index.js';
export { createRemoteKms, type RemoteKmsOptions } from './remote/index.js';
