/** destroy_dek_versions_before: destroys the versions older than keep_from_version. */
import { record, uint } from './fields.js';
import { singleOp } from './op.js';
import { destroyResultBinary, destroyResultRecord, KEY_ID } from './shapes.js';

export interface KeepFromParams {
  keyId: string;
  keepFromVersion: number;
}

export const destroyDekVersionsBefore = singleOp({
  name: 'destroy_dek_versions_before',
  code: 0x08,
  idempotent: false,
  http: {
    method: 'POST',
    path: '/destroy_dek_versions_before',
    help: '{"key_id","keep_from_version"} → {"key_id","destroyed_versions"}',
    strict: true,
  },
  json: {
    request: record<KeepFromParams>({ keyId: KEY_ID, keepFromVersion: uint('keep_from_version') }),
    result: destroyResultRecord,
  },
  binary: {
    request: {
      write: (w, p: KeepFromParams) => void w.str(p.keyId).u32(p.keepFromVersion),
      read: (r) => ({ op: 'destroy_dek_versions_before', keyId: r.str(), keepFromVersion: r.u32() }),
    },
    result: destroyResultBinary,
  },
  run: (kms, p, ctx) => kms.destroyDekVersionsBefore(p.keyId, p.keepFromVersion, ctx),
});
