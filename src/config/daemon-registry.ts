/**
 * The daemon's registry settings: where the registry lives (the data directory's LMDB, or an etcd
 * cluster shared by several replicas) and how to reach etcd. Flags, environment and the config
 * file's `registry:` section; createKms checks the values (registryLocation).
 */
import { z } from 'zod';
import { type FieldTable, parseInteger } from './layers.js';
import type { KmsOptions } from './library.js';

/** The `serve` flags of this section (commander's camelCase names). */
export interface RegistryFlags {
  registry?: string;
  cluster?: string;
  replicaId?: string;
  leaseTtl?: number;
  etcdCaFile?: string;
  etcdCertFile?: string;
  etcdKeyFile?: string;
  etcdUser?: string;
  etcdPasswordFile?: string;
}

/** The config file's `registry:` section. */
export const RegistryFileSchema = z.strictObject({
  url: z.string().optional(),
  cluster: z.string().optional(),
  replica_id: z.string().optional(),
  lease_ttl_seconds: z.number().int().optional(),
  etcd: z
    .strictObject({
      ca_file: z.string().optional(),
      cert_file: z.string().optional(),
      key_file: z.string().optional(),
      user: z.string().optional(),
      password_file: z.string().optional(),
    })
    .optional(),
});

export const REGISTRY_FIELDS = {
  registry: { env: ['PROGRESSDB_KMS_REGISTRY'], flags: ['registry'], file: 'registry.url' },
  cluster: { env: ['PROGRESSDB_KMS_CLUSTER'], flags: ['cluster'], file: 'registry.cluster' },
  replica_id: { env: ['PROGRESSDB_KMS_REPLICA_ID'], flags: ['replica-id'], file: 'registry.replica_id' },
  lease_ttl: {
    env: ['PROGRESSDB_KMS_LEASE_TTL_SECONDS'],
    flags: ['lease-ttl'],
    file: 'registry.lease_ttl_seconds',
    fromEnv: parseInteger,
  },
  etcd_ca_file: {
    env: ['PROGRESSDB_KMS_ETCD_CA_FILE'],
    flags: ['etcd-ca-file'],
    file: 'registry.etcd.ca_file',
  },
  etcd_cert_file: {
    env: ['PROGRESSDB_KMS_ETCD_CERT_FILE'],
    flags: ['etcd-cert-file'],
    file: 'registry.etcd.cert_file',
  },
  etcd_key_file: {
    env: ['PROGRESSDB_KMS_ETCD_KEY_FILE'],
    flags: ['etcd-key-file'],
    file: 'registry.etcd.key_file',
  },
  etcd_user: { env: ['PROGRESSDB_KMS_ETCD_USER'], flags: ['etcd-user'], file: 'registry.etcd.user' },
  etcd_password_file: {
    env: ['PROGRESSDB_KMS_ETCD_PASSWORD_FILE'],
    flags: ['etcd-password-file'],
    file: 'registry.etcd.password_file',
  },
} as const satisfies FieldTable;

export type RegistryField = keyof typeof REGISTRY_FIELDS;

/**
 * The createKms options of this section. `get` is a setting's value; `filePath` the same for a
 * path, resolved against the config file's directory when it came from the file.
 */
export function registryOptions(
  get: (key: RegistryField) => unknown,
  filePath: (key: RegistryField) => string | undefined,
): Partial<KmsOptions> {
  const out: Partial<KmsOptions> = {};
  const text = (key: RegistryField) => get(key) as string | undefined;
  const registry = text('registry');
  if (registry !== undefined) out.registry = registry;
  const cluster = text('cluster');
  if (cluster !== undefined) out.cluster = cluster;
  const replicaId = text('replica_id');
  if (replicaId !== undefined) out.replicaId = replicaId;
  const leaseTtl = get('lease_ttl') as number | undefined;
  if (leaseTtl !== undefined) out.leaseTtlSeconds = leaseTtl;
  const tls = {
    caFile: filePath('etcd_ca_file'),
    certFile: filePath('etcd_cert_file'),
    keyFile: filePath('etcd_key_file'),
  };
  const given = Object.entries(tls).filter(([, v]) => v !== undefined);
  if (given.length > 0) out.etcdTls = Object.fromEntries(given);
  const user = text('etcd_user');
  if (user !== undefined) out.etcdUser = user;
  const passwordFile = filePath('etcd_password_file');
  if (passwordFile !== undefined) out.etcdPasswordFile = passwordFile;
  return out;
}
