/**
 * Endpoint strings as both the daemon (to listen) and the clients (to connect) accept them:
 * `host:port`, `[v6]:port`, `http://host:port`, `https://host:port` or `tcp://host:port`, and for
 * clients also `tls://host:port` (the TCP bridge over TLS, as the daemon announces it).
 */
import { isIP } from 'node:net';
import { kmsError } from '../errors.js';

export type EndpointScheme = 'http' | 'https' | 'tcp' | 'tls';

/**
 * Schemes a listener takes. Not `tls://`: whether the bridge speaks TLS follows from the daemon's
 * certificate options, and a scheme saying otherwise would only mislead.
 */
export const LISTEN_SCHEMES: readonly EndpointScheme[] = ['http', 'https', 'tcp'];
/** Schemes a client connects to: `tls://` is the TCP bridge over TLS. */
export const CLIENT_SCHEMES: readonly EndpointScheme[] = [...LISTEN_SCHEMES, 'tls'];

export interface Endpoint {
  /** The scheme written in the string, if any. */
  scheme: EndpointScheme | undefined;
  /** Host name or IP address, without IPv6 brackets. */
  host: string;
  port: number;
}

export const DEFAULT_HTTP_PORT = 6820;

const SCHEME = /^([a-z][a-z0-9+.-]*):\/\/(.*)$/i;
const HOST_PORT = /^(?:\[([0-9a-fA-F:.]+)\]|([^:/[\]\s]+))(?::(\d{1,5}))?\/?$/;

/** Why parseEndpoint refused a string, in its error's `details.reason`. */
export type EndpointProblem = 'scheme' | 'form' | 'ipv6' | 'port';

export function parseEndpoint(
  input: string,
  defaultPort = DEFAULT_HTTP_PORT,
  schemes: readonly EndpointScheme[] = LISTEN_SCHEMES,
): Endpoint {
  const text = input.trim();
  let scheme: EndpointScheme | undefined;
  let rest = text;
  const schemeMatch = SCHEME.exec(text);
  if (schemeMatch) {
    // SCHEME's two groups take part in every match.
    const name = (schemeMatch[1] as string).toLowerCase() as EndpointScheme;
    if (!schemes.includes(name)) {
      throw kmsError(
        'CONFIG_INVALID',
        `endpoint "${input}": unsupported scheme "${name}" (${schemes.join(', ')})`,
        { reason: 'scheme' },
      );
    }
    scheme = name;
    rest = schemeMatch[2] as string;
  }
  const m = HOST_PORT.exec(rest);
  if (!m) throw kmsError('CONFIG_INVALID', `endpoint "${input}" is not host:port`, { reason: 'form' });
  const host = (m[1] ?? m[2]) as string;
  if (m[1] !== undefined && isIP(host) !== 6) {
    throw kmsError('CONFIG_INVALID', `endpoint "${input}": "${host}" is not an IPv6 address`, {
      reason: 'ipv6',
    });
  }
  const port = m[3] === undefined ? defaultPort : Number(m[3]);
  if (port > 65535) {
    throw kmsError('CONFIG_INVALID', `endpoint "${input}": port must be 0 to 65535`, { reason: 'port' });
  }
  return { scheme, host, port };
}

/**
 * True for addresses only this machine can reach; names other than localhost count as remote. The
 * server's and the daemon's one check.
 */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase();
  if (h === 'localhost' || h === '::1') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  return h.startsWith('::ffff:127.');
}

/** `host:port` with brackets around IPv6 literals, for logs and URLs. */
export function formatHostPort(host: string, port: number): string {
  return isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`;
}
