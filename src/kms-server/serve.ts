/**
 * The `progressdb-kms serve` entry: configuration → createKms → HTTP listener (+ TCP bridge),
 * and the graceful shutdown on SIGTERM/SIGINT (stop accepting, drain in-flight requests, close
 * the KMS, which flushes the audit log and closes LMDB).
 */
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import type { Kms } from '../api/index.js';
import {
  type DaemonConfig,
  type DaemonLimits,
  exposedListeners,
  loadDaemonConfig,
  type ServeFlags,
} from '../config/daemon.js';
import { type KmsOptions, resolveMaxBatch } from '../config/library.js';
import { createKms } from '../kms/index.js';
import { createLogger, type Logger } from '../log.js';
import { formatHostPort } from '../wire/endpoint.js';
import { listenError, listenOn } from '../wire/listen.js';
import { Authenticator } from './auth.js';
import { BridgeServer } from './bridge.js';
import { PerAddressLimit } from './connection-limits.js';
import { createHttpApp } from './http-app.js';
import { DaemonMetrics } from './metrics.js';
import type { RouteServices } from './route.js';

export interface RunningDaemon {
  http: AddressInfo;
  bridge: AddressInfo | null;
  /** Graceful stop: resolves once listeners are closed and the KMS is closed. */
  close(): Promise<void>;
  /** SIGHUP: opens the audit log anew (after logrotate renamed it). */
  reopenAuditLog(): boolean;
}

export type KmsFactory = (opts: KmsOptions) => Promise<Kms>;

/**
 * Connection limits of the HTTP listener: per-address limit at accept, and an idle timeout that
 * closes a socket with no request in flight and no bytes for `idle_timeout_ms`, a socket that
 * never sends a byte included (Node's headersTimeout is only checked every few seconds and only
 * once a request began). Keep-alive clients see a closed idle socket and open a new one.
 */
function limitHttpConnections(server: http.Server, limits: DaemonLimits, metrics: DaemonMetrics): void {
  const perAddress = new PerAddressLimit(limits.maxConnectionsPerAddress);
  const inFlight = new WeakMap<Socket, number>();
  server.timeout = limits.idleTimeoutMs;
  // On the raw socket, before a TLS handshake: an address at its limit costs no handshake either.
  server.prependListener('connection', (socket: Socket) => {
    if (perAddress.admit(socket)) return;
    metrics.connectionClosed('http', 'per_address_limit');
    socket.destroy();
  });
  server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const socket = req.socket;
    inFlight.set(socket, (inFlight.get(socket) ?? 0) + 1);
    res.once('close', () => inFlight.set(socket, (inFlight.get(socket) ?? 1) - 1));
  });
  // With a listener here Node no longer destroys timed-out sockets itself: a request still being
  // answered (a slow KMS call) keeps its socket; requestTimeout bounds it.
  server.on('timeout', (socket: Socket) => {
    if ((inFlight.get(socket) ?? 0) > 0) return;
    metrics.connectionClosed('http', 'idle');
    socket.destroy();
  });
}

/** The HTTP(S) server of the app, with the listener's timeouts and connection limits. */
function httpServerOf(
  handler: http.RequestListener,
  tlsOptions: ReturnType<Authenticator['serverTlsOptions']>,
  limits: DaemonLimits,
  metrics: DaemonMetrics,
): http.Server {
  const serverOptions: http.ServerOptions = {
    keepAliveTimeout: limits.idleTimeoutMs,
    headersTimeout: limits.headersTimeoutMs,
    requestTimeout: limits.requestTimeoutMs,
    // How often Node checks headersTimeout and requestTimeout (default 30 s, coarser than they are).
    connectionsCheckingInterval: Math.min(1_000, limits.headersTimeoutMs),
  };
  const server = tlsOptions
    ? https.createServer({ ...tlsOptions, ...serverOptions }, handler)
    : http.createServer(serverOptions, handler);
  server.maxConnections = limits.maxConnections;
  limitHttpConnections(server, limits, metrics);
  return server;
}

export async function startDaemon(
  config: DaemonConfig,
  logger: Logger,
  makeKms: KmsFactory = createKms,
): Promise<RunningDaemon> {
  for (const where of exposedListeners(config)) {
    logger.warn(
      `INSECURE: ${where} is reachable from other machines and anyone may call it ` +
        '(no client certificates, tokens or allowed_networks; --insecure)',
    );
  }
  const kms = await makeKms({ ...config.kms, logger });
  const auth = new Authenticator(config.tokens, config.tls, config.allowedNetworks);
  const metrics = new DaemonMetrics();
  let draining = false;
  const services: RouteServices = { kms, metrics, limits: config.limits, accepting: () => !draining };
  const app = createHttpApp({
    services,
    auth,
    logger,
    accessLog: config.accessLog,
    draining: () => draining,
  });
  const tlsOptions = auth.serverTlsOptions();
  const { limits } = config;
  const httpServer = httpServerOf(app.callback(), tlsOptions, limits, metrics);
  const bridge = config.bridge
    ? new BridgeServer({ kms, auth, metrics, limits, logger, mergeItems: resolveMaxBatch(config.kms) })
    : null;

  const tlsMode = config.tls === null ? 'off' : config.tls.ca ? 'mutual' : 'on';
  const announce = (listener: string, scheme: string, address: AddressInfo) => {
    const where = formatHostPort(address.address, address.port);
    logger.info(
      { listener, address: where, port: address.port, tls: tlsMode, auth: auth.mode },
      `${listener} listening on ${scheme}://${where} (TLS ${tlsMode}, auth ${auth.mode})`,
    );
  };

  let httpAddress: AddressInfo;
  let bridgeAddress: AddressInfo | null = null;
  try {
    httpAddress = await listenOn(httpServer, config.http.host, config.http.port, 'endpoint');
    if (bridge && config.bridge) {
      bridgeAddress = await bridge.listen(config.bridge.host, config.bridge.port).catch((err) => {
        // Only reached when the bridge was configured (its listen call is what failed).
        const bridge = config.bridge as NonNullable<typeof config.bridge>;
        throw listenError('bridge endpoint', bridge.host, bridge.port, err);
      });
    }
  } catch (err) {
    httpServer.close();
    await kms.close();
    throw err;
  }
  announce('http', tlsOptions ? 'https' : 'http', httpAddress);
  if (bridgeAddress) announce('bridge', tlsOptions ? 'tls' : 'tcp', bridgeAddress);

  let closing: Promise<void> | null = null;
  const close = () => {
    closing ??= (async () => {
      draining = true;
      const deadline = config.drainTimeoutMs;
      const httpClosed = new Promise<void>((resolve) => httpServer.close(() => resolve()));
      httpServer.closeIdleConnections();
      const forceHttp = setTimeout(() => httpServer.closeAllConnections(), deadline);
      await Promise.all([httpClosed, bridge?.close(deadline)]);
      clearTimeout(forceHttp);
      await kms.close();
    })();
    return closing;
  };
  const reopenAuditLog = () => kms.reopenAuditLog?.() ?? false;
  return { http: httpAddress, bridge: bridgeAddress, close, reopenAuditLog };
}

/**
 * CLI entry: runs until SIGTERM/SIGINT, then drains and resolves; SIGHUP reopens the audit log.
 * Config errors reject.
 */
export async function serve(flags: ServeFlags, makeKms: KmsFactory = createKms): Promise<void> {
  const config = loadDaemonConfig(flags);
  const logger = createLogger('progressdb-kms');
  for (const line of config.deprecations) logger.warn(line);
  const daemon = await startDaemon(config, logger, makeKms);
  await new Promise<void>((resolve, reject) => {
    const reopen = () => {
      logger.info({ signal: 'SIGHUP' }, 'reopening the audit log');
      daemon.reopenAuditLog();
    };
    const stop = (signal: NodeJS.Signals) => {
      process.off('SIGTERM', stop);
      process.off('SIGINT', stop);
      process.off('SIGHUP', reopen);
      logger.info({ signal }, 'shutting down: draining in-flight requests');
      daemon.close().then(() => {
        logger.info('stopped');
        resolve();
      }, reject);
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    process.on('SIGHUP', reopen);
  });
}
