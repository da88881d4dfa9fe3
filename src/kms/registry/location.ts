/**
 * Which registry a KMS uses: the LMDB file in its data directory (one node, the default) or an
 * etcd cluster that several replicas share (`etcd://h1:2379,h2:2379`, `etcds://` for TLS).
 * Every replica keeps its own data directory for its audit log; in etcd its keys live under
 * `/progressdb-kms/<cluster>/`, so one etcd can serve several KMS clusters. This module only
 * checks the options: opening (open.ts) loads the etcd client, which single-node users never need.
 */
import { kmsError } from '../../errors.js';
import { formatHostPort, parseEndpoint } from '../../wire/endpoint.js';

/** Rewraps per etcd transaction: each is a compare and a write, within etcd's 128 ops per transaction. */
export const ETCD_ROTATION_BATCH = 40;
/** The most: 60 compares and writes, and a few for KEK counts and progress, stay under 128. */
export const ETCD_MAX_ROTATION_BATCH = 60;
const CLUSTER_NAME = /^[A-Za-z0-9._-]{1,64}$/;
const REPLICA_ID = /^[A-Za-z0-9._:-]{1,64}$/;
const ETCD_PORT = 2379;

export interface EtcdTlsFiles {
  /** CA of the etcd members' certificates (default: the system store). */
  caFile?: string;
  /** Our client certificate and key, for etcd's client certificate auth. */
  certFile?: string;
  keyFile?: string;
}

export interface RegistryOptions {
  /** `lmdb` (default) or `etcd://host:port,...` / `etcds://...`. */
  url?: string;
  /** Key prefix of this KMS cluster in etcd. Default `default`. */
  cluster?: string;
  etcdTls?: EtcdTlsFiles;
  /** etcd user; its password is read from `etcdPasswordFile`. */
  etcdUser?: string;
  etcdPasswordFile?: string;
  /** A replica's etcd lease TTL (etcd-membership.ts). */
  leaseTtlSeconds?: number;
  /** This replica's unique name in the cluster (members, locks, audit lines). */
  replicaId?: string;
}

export type RegistryLocation =
  | { kind: 'lmdb' }
  | { kind: 'etcd'; hosts: string[]; secure: boolean; prefix: string; cluster: string };

/** Checks the options without connecting; CONFIG_INVALID names what is wrong. */
export function registryLocation(opts: RegistryOptions): RegistryLocation {
  const url = opts.url?.trim();
  if (url === undefined || url === '' || url === 'lmdb') return { kind: 'lmdb' };
  const match = /^(etcds?):\/\/(.+)$/.exec(url);
  if (!match) {
    throw kmsError(
      'CONFIG_INVALID',
      `registry "${url}": use lmdb, etcd://host:port,... or etcds://host:port,...`,
    );
  }
  const secure = match[1] === 'etcds';
  const hosts = (match[2] as string).split(',').map((part) => {
    const ep = parseEndpoint(part.trim(), ETCD_PORT, []);
    return `${secure ? 'https' : 'http'}://${formatHostPort(ep.host, ep.port)}`;
  });
  const cluster = opts.cluster ?? 'default';
  if (!CLUSTER_NAME.test(cluster)) {
    throw kmsError('CONFIG_INVALID', 'cluster must be 1-64 letters, digits, dots, dashes or underscores');
  }
  if (opts.replicaId !== undefined && !REPLICA_ID.test(opts.replicaId)) {
    throw kmsError(
      'CONFIG_INVALID',
      'replica id must be 1-64 letters, digits, dots, colons, dashes or underscores',
    );
  }
  if ((opts.etcdUser === undefined) !== (opts.etcdPasswordFile === undefined)) {
    throw kmsError('CONFIG_INVALID', 'give the etcd user and its password file together');
  }
  const tls = opts.etcdTls ?? {};
  if ((tls.certFile === undefined) !== (tls.keyFile === undefined)) {
    throw kmsError('CONFIG_INVALID', 'give the etcd client certificate and key together');
  }
  if (!secure && (tls.caFile || tls.certFile)) {
    throw kmsError('CONFIG_INVALID', 'etcd TLS files were given for an etcd:// registry: use etcds://');
  }
  return { kind: 'etcd', hosts, secure, cluster, prefix: `/progressdb-kms/${cluster}/` };
}
