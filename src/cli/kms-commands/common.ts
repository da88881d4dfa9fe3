/**
 * What the `progressdb-kms` sub-commands that work on a data directory directly share. Each
 * command returns the process exit code and prints its own messages; CLI wiring lives in
 * src/cli/progressdb-kms.ts.
 */
import path from 'node:path';
import {
  REGISTRY_FIELDS,
  type RegistryField,
  type RegistryFlags,
  registryOptions,
} from '../../config/daemon-registry.js';
import { givenKmsDataDir, resolveRegistry } from '../../config/library.js';
import { kmsError, toCodedError } from '../../errors.js';
import type { RegistryOptions } from '../../kms/registry/location.js';

export interface DataDirCommandOptions {
  /** Else PROGRESSDB_KMS_DATA_DIR, as for `serve`. */
  dataDir?: string;
  masterKeyFile?: string;
}

export function dataDirOf(opts: DataDirCommandOptions): string {
  const dir = givenKmsDataDir(opts.dataDir);
  if (dir === undefined) {
    throw kmsError('CONFIG_INVALID', 'no data directory: pass --data-dir or set PROGRESSDB_KMS_DATA_DIR');
  }
  return path.resolve(dir);
}

/** Prints the error as one line on stderr → exit code 1. */
export function report(err: unknown): number {
  const coded = toCodedError(err);
  process.stderr.write(`progressdb-kms: ${coded.code}: ${coded.message}\n`);
  return 1;
}

/** The registry options of an offline command's registry flags (env fallbacks as for `serve`). */
export function registryOf(flags: RegistryFlags): RegistryOptions {
  // The same flag-to-option mapping as `serve` (daemon-registry.ts), read from commander's
  // camelCase names of each field's flag.
  const flag = (key: RegistryField) => {
    const name = REGISTRY_FIELDS[key].flags[0].replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
    return (flags as Record<string, unknown>)[name] as string | undefined;
  };
  return resolveRegistry(registryOptions(flag, flag));
}
