/**
 * The package as users run it: the build in dist/ (`npm run bench` builds first), loaded at run
 * time so the harness typechecks without a build. Its types are those of the sources it is
 * built from.
 */
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type * as Package from '../src/index.js';

const BUILT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../dist/src/index.js');

let loaded: typeof Package;
try {
  loaded = (await import(pathToFileURL(BUILT).href)) as typeof Package;
} catch (err) {
  throw new Error(`cannot load the built package (${BUILT}); run npm run build first`, { cause: err });
}

export const { createKms, createRemoteKms, generateMasterKeyFile } = loaded;
export type { Kms } from '../src/index.js';
