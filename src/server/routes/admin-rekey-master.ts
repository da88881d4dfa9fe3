/**
 * POST /admin/encryption/rekey-master: the embedded KMS's master re-key (src/kms/rekey.ts), online.
 * The body names a key file on this host (never key bytes over HTTP); in external mode the daemon
 * holds the master key, and `progressdb-kms rekey` re-keys it.
 */
import { z } from 'zod';
import { UserError } from '../../errors.js';
import type { EmbeddedKmsHandle } from '../../kms/index.js';
import { callContext } from '../context.js';
import { serverRoute } from './route.js';

const message = 'send {"new_master_key_file": "<path of a 0600 key file on this host>"}';

export const adminRekeyMaster = serverRoute({
  method: 'POST',
  path: '/admin/encryption/rekey-master',
  scope: 'admin',
  help: '{"new_master_key_file"} → every KEK version rewrapped under that key; start with it from now on',
  body: z.object(
    { new_master_key_file: z.string({ error: message }).min(1, message).max(4096, message) },
    { error: message },
  ),
  handle: async (ctx, { service }, { body }) => {
    const kms = service.requireKms() as Partial<EmbeddedKmsHandle>;
    if (kms.rekeyMaster === undefined) {
      throw new UserError(
        'CONFLICT',
        'the master key is held by the external KMS daemon: re-key it there (progressdb-kms rekey)',
      );
    }
    const result = await kms.rekeyMaster({ newMasterKeyFile: body.new_master_key_file }, callContext(ctx));
    ctx.body = { kek_versions: result.kekVersions, audit_keys: result.auditKeys };
  },
});
