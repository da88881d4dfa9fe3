/**
 * The registry's key names in its store (the namespaces store.ts describes), in one place.
 */
export const KEK_META = 'meta/kek';
export const FORMAT = 'meta/format';
/** Key check value of the KEK-wrapping key (CheckKekTask): tells a wrong master key from corruption. */
export const KCV = 'meta/kcv';
export const ROTATION = 'rotation';
/** Present while `progressdb-kms migrate` copies into this store (migrate.ts): refused. */
export const MIGRATING = 'meta/migrating';
/** Where the audit log's sessions have reached (src/audit-link.ts): what `audit verify` checks the log against. */
export const AUDIT_HEAD = 'audit-head';
export const KEK_PREFIX = 'kek/';
export const DEK_PREFIX = 'dek/';
export const THREAD_PREFIX = 'thread/';
export const FORMAT_VERSION = 1;
/** The cluster lock a rotation runs under (StoreCluster): one replica rotates at a time. */
export const ROTATION_LOCK = 'rotation';

export const kekKey = (version: number) => KEK_PREFIX + version;
export const dekKey = (keyId: string) => DEK_PREFIX + keyId;
export const threadKey = (threadId: string) => THREAD_PREFIX + threadId;
