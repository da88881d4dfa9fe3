/** Public entry of the `progressdb` package: the KMS as a library, its errors and protocol types. */

export * from './errors.js';
export type { EmbeddedKmsHandle } from './kms/index.js';
export {
  createKms,
  generateMasterKey,
  generateMasterKeyFile,
  MAX_AAD_BYTES,
  MAX_PLAINTEXT_BYTES,
} from './kms/index.js';
export type { KmsOptions } from './kms/options.js';
export type * from './protocol.js';
export { createRemoteKms, type RemoteKmsOptions } from './remote/index.js';
