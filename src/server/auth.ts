/**
 * Bearer-key checks. Keys are compared in constant time: both sides are hashed to 32 bytes first
 * (so lengths never differ) and every configured key is compared, with no early exit.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { Middleware } from 'koa';
import { UserError } from '../errors.js';

export type Scope = 'data' | 'admin';

interface HashedKey {
  name: string;
  scope: Scope;
  digest: Buffer;
}

export interface Caller {
  name: string;
  scope: Scope | 'anonymous';
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

export class KeyRing {
  private readonly keys: HashedKey[];

  constructor(
    apiKeys: readonly { name: string; key: string }[],
    adminKey: string,
    /** With no API keys configured (loopback only), data endpoints are open. */
    private readonly dataOpen = apiKeys.length === 0,
  ) {
    this.keys = [
      ...apiKeys.map((k) => ({ name: k.name, scope: 'data' as const, digest: digest(k.key) })),
      { name: 'admin', scope: 'admin' as const, digest: digest(adminKey) },
    ];
  }

  /** The key presented, if it matches one; undefined otherwise. */
  identify(token: string): HashedKey | undefined {
    const presented = digest(token);
    let found: HashedKey | undefined;
    for (const k of this.keys) {
      if (timingSafeEqual(presented, k.digest) && found === undefined) found = k;
    }
    return found;
  }

  /** Koa middleware admitting callers of `scope`; sets `ctx.state.caller`. */
  require(scope: Scope): Middleware {
    return async (ctx, next) => {
      const header = ctx.get('authorization');
      if (header === '') {
        if (scope === 'data' && this.dataOpen) {
          ctx.state.caller = { name: 'anonymous', scope: 'anonymous' } satisfies Caller;
          return next();
        }
        throw new UserError('UNAUTHENTICATED', 'send Authorization: Bearer <key>');
      }
      const m = /^Bearer +(\S+) *$/i.exec(header);
      if (!m) throw new UserError('UNAUTHENTICATED', 'Authorization must be "Bearer <key>"');
      const key = this.identify(m[1] as string);
      if (key === undefined) throw new UserError('UNAUTHENTICATED', 'unknown key');
      if (key.scope !== scope) {
        throw new UserError(
          'FORBIDDEN',
          scope === 'admin' ? 'this endpoint needs the admin key' : 'the admin key is not an API key',
        );
      }
      ctx.state.caller = { name: key.name, scope: key.scope } satisfies Caller;
      return next();
    };
  }
}
