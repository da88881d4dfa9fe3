/**
 * Opens the registry that the options name (location.ts): LMDB in the data directory, or the etcd
 * store. The etcd client (gRPC) is loaded only when an etcd registry is asked for.
 */
import fs from 'node:fs';
import os from 'node:os';
import { ExponentialBackoff } from 'cockatiel';
import type { IOptions } from 'etcd3';
import { kmsError } from '../../errors.js';
import type { EtcdStore } from './etcd.js';
import { DEFAULT_LEASE_TTL_SECONDS } from './etcd-membership.js';
import { Registry } from './index.js';
import { LmdbStore } from './lmdb.js';
import { type RegistryLocation, type RegistryOptions, registryLocation } from './location.js';

function readFile(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw kmsError('CONFIG_INVALID', `cannot read ${what} ${file} (${(err as NodeJS.ErrnoException).code})`);
  }
}

/** How long one etcd request may take before it fails (the client may retry it on another member). */
const ETCD_CALL_TIMEOUT_MS = 3000;

/**
 * How long a broken watch waits at most before it reconnects. The client's default (30 s) would
 * keep a replica on uncached reads, one etcd round trip each, for up to half a minute after its
 * member came back.
 */
export const ETCD_WATCH_MAX_BACKOFF_MS = 2000;

/** The fault handling every KMS etcd client uses: the client's defaults, with a shorter watch backoff. */
export function etcdFaultHandling(): NonNullable<IOptions['faultHandling']> {
  // etcd3 calls `next()` on what it is given: it wants the backoff factory, whatever its type says.
  const watchBackoff = new ExponentialBackoff({ maxDelay: ETCD_WATCH_MAX_BACKOFF_MS });
  return { watchBackoff: watchBackoff as unknown as NonNullable<IOptions['faultHandling']>['watchBackoff'] };
}

export function etcdClientOptions(
  location: Extract<RegistryLocation, { kind: 'etcd' }>,
  opts: RegistryOptions,
): IOptions {
  const options: IOptions = {
    hosts: location.hosts,
    // A unary call that etcd cannot answer (no quorum) fails in bounded time as
    // REGISTRY_UNAVAILABLE instead of hanging its caller; streams (watch, keepalive) stay open.
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + ETCD_CALL_TIMEOUT_MS }),
    faultHandling: etcdFaultHandling(),
  };
  const tls = opts.etcdTls ?? {};
  // https:// hosts alone make the client use TLS with the system's CAs; files replace them.
  if (location.secure && (tls.caFile !== undefined || tls.certFile !== undefined)) {
    options.credentials = {
      rootCertificate: tls.caFile === undefined ? Buffer.alloc(0) : readFile(tls.caFile, 'etcd CA file'),
      ...(tls.certFile && { certChain: readFile(tls.certFile, 'etcd certificate file') }),
      ...(tls.keyFile && { privateKey: readFile(tls.keyFile, 'etcd key file') }),
    };
  }
  if (opts.etcdUser !== undefined && opts.etcdPasswordFile !== undefined) {
    const password = readFile(opts.etcdPasswordFile, 'etcd password file').toString('utf8').trim();
    options.auth = { username: opts.etcdUser, password };
  }
  return options;
}

export interface ReplicaOptions {
  /** Told when this replica stops or starts serving (its etcd lease lapsed or was renewed). */
  onServingChange?: (serving: boolean, why: string) => void;
}

/** Opens the registry the options name; `dataDir` holds the LMDB one. */
export async function openRegistry(
  dataDir: string,
  opts: RegistryOptions,
  replica: ReplicaOptions = {},
): Promise<Registry> {
  const location = registryLocation(opts);
  if (location.kind === 'lmdb') return Registry.openDataDir(dataDir);
  const [{ Etcd3 }, { EtcdStore }] = await Promise.all([import('etcd3'), import('./etcd.js')]);
  const client = new Etcd3(etcdClientOptions(location, opts));
  let store: EtcdStore | undefined;
  // The audit head describes this replica's own log, so it stays in its data directory.
  const local = LmdbStore.open(dataDir);
  try {
    store = await EtcdStore.open({
      client,
      prefix: location.prefix,
      onClose: () => client.close(),
      membership: {
        replicaId: opts.replicaId ?? `${os.hostname()}-${process.pid}`,
        ttlSeconds: opts.leaseTtlSeconds ?? DEFAULT_LEASE_TTL_SECONDS,
        ...(replica.onServingChange && { onStateChange: replica.onServingChange }),
      },
    });
    return await Registry.open(store, local);
  } catch (err) {
    if (store) await store.close();
    else client.close();
    await local.close();
    throw err;
  }
}

/**
 * Runs `fn` on the etcd store under `location`'s prefix, opened without joining the cluster (no
 * lease, no membership), and closes it (or the client, if the open failed) however `fn` ends: for
 * the offline tools that read or write a cluster's registry.
 */
export async function withEtcdStore<T>(
  location: Extract<RegistryLocation, { kind: 'etcd' }>,
  opts: RegistryOptions,
  fn: (store: EtcdStore) => Promise<T>,
): Promise<T> {
  const [{ Etcd3 }, { EtcdStore }] = await Promise.all([import('etcd3'), import('./etcd.js')]);
  const client = new Etcd3(etcdClientOptions(location, opts));
  let store: EtcdStore | undefined;
  try {
    store = await EtcdStore.open({ client, prefix: location.prefix, onClose: () => client.close() });
    return await fn(store);
  } finally {
    if (store) await store.close();
    else client.close();
  }
}

/**
 * One value of the registry the options name, read without opening a KMS: from the data
 * directory's LMDB (read-only, no lock), or from an etcd prefix without joining the cluster.
 * For offline tools that need a shared record (a cluster's audit keys after a re-key).
 */
export async function readRegistryValue(
  dataDir: string,
  opts: RegistryOptions,
  key: string,
): Promise<unknown> {
  const location = registryLocation(opts);
  if (location.kind === 'lmdb') return LmdbStore.readOnce(dataDir, key);
  return withEtcdStore(location, opts, (store) => store.get(key));
}
