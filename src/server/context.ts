/** What every route file is given: the server's parts, built once at start-up. */
import type { Context } from 'koa';
import type { CallContext, Kms } from '../api/index.js';
import type { ServerConfig } from '../config/server.js';
import type { Logger } from '../log.js';
import type { Caller, KeyRing } from './auth.js';
import type { JobRunner } from './jobs.js';
import type { ServerMetrics } from './metrics.js';
import type { ChatService } from './service.js';

export interface AppParts {
  config: ServerConfig;
  service: ChatService;
  jobs: JobRunner;
  /** null when encryption is off. */
  kms: Kms | null;
  keys: KeyRing;
  metrics: ServerMetrics;
  logger: Logger;
  startedAt: Date;
}

/** The audit identity of the request: the API key's name and the peer address. */
export function callContext(ctx: Context): CallContext {
  const caller = ctx.state.caller as Caller | undefined;
  return { caller: caller?.name ?? 'anonymous', remoteAddress: ctx.ip };
}
