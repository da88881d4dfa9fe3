/**
 * Who may call the daemon, on both listeners.
 *
 * - TLS: server certificate and key; with a CA, client certificates signed by it are required.
 *   The handshake asks for one but does not abort without it: every request (HTTP) or connection
 *   (bridge) is refused before anything else runs, with 401 (no certificate) or 403 (not
 *   trusted). The caller then gets a clear auth error instead of a reset connection.
 * - Bearer tokens from the config: HTTP `Authorization: Bearer T`, bridge AUTH frame. Tokens are
 *   compared as SHA-256 digests with timingSafeEqual (fixed length, so the comparison time says
 *   nothing about the token), and every configured token is compared, so the time does not say
 *   which one matched either. Missing token → 401 UNAUTHENTICATED, wrong token → 403 FORBIDDEN.
 *
 * - Allowed networks (`allowed_networks`, CIDR): a caller whose remote address is in one of them
 *   is authorized by its address alone, without a token or a client certificate (the ProgressDB Go
 *   client sends neither). A token it does present is still checked (a wrong one is refused).
 *   Callers outside every network need the token or certificate configured; with neither
 *   configured they are refused with 403. The list only adds callers: it never refuses a valid
 *   token or certificate, and loopback is not special (list 127.0.0.0/8 or ::1/128 to admit it).
 *
 * The audit caller is the token name, else `network:<cidr>`, else the client certificate's subject
 * CN, else "anonymous". The remote address recorded is the plain IPv4 form of an IPv4-mapped one.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { BlockList, isIPv4, type Socket } from 'node:net';
import type { TLSSocket, TlsOptions } from 'node:tls';
import type { CallContext } from '../api/index.js';
import { type CodedError, kmsError } from '../errors.js';

export interface TokenEntry {
  name: string;
  token: string;
}

export interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
  /** Present: mutual TLS, client certificates required. */
  ca?: Buffer | undefined;
}

/** Distinct (caller, address) contexts kept; the cache starts over beyond this. */
const MAX_CACHED_CONTEXTS = 4096;

/** An `allowed_networks` entry, as written in the config (`text`) and parsed. */
export interface AllowedNetwork {
  text: string;
  address: string;
  prefix: number;
  family: 'ipv4' | 'ipv6';
}

/** E.g. `none`, `token`, `mtls+token`, `token+network`: what a caller can authenticate with. */
export type AuthMode = string;

/** The remote address of a socket; an IPv4-mapped IPv6 address (`::ffff:10.1.2.3`) as plain IPv4. */
export function remoteAddressOf(socket: Socket): string | undefined {
  const address = socket.remoteAddress;
  if (address === undefined) return undefined;
  if (address.length > 7 && address.slice(0, 7).toLowerCase() === '::ffff:') {
    const v4 = address.slice(7);
    if (isIPv4(v4)) return v4;
  }
  return address;
}

function digest(token: string): Buffer {
  return createHash('sha256').update(token, 'utf8').digest();
}

export class Authenticator {
  private readonly digests: { name: string; digest: Buffer }[];
  private readonly callerOfSocket = new WeakMap<Socket, string>();
  private readonly contexts = new Map<string, CallContext>();
  private readonly networks: { text: string; list: BlockList }[];

  constructor(
    tokens: readonly TokenEntry[],
    private readonly tls: TlsMaterial | null,
    networks: readonly AllowedNetwork[] = [],
  ) {
    this.digests = tokens.map((t) => ({ name: t.name, digest: digest(t.token) }));
    // One list per network, so the audit caller can name the network that matched.
    this.networks = networks.map((n) => {
      const list = new BlockList();
      list.addSubnet(n.address, n.prefix, n.family);
      return { text: n.text, list };
    });
  }

  /** The first allowed network holding the socket's remote address, as written in the config. */
  networkOf(socket: Socket): string | undefined {
    if (this.networks.length === 0) return undefined;
    const address = remoteAddressOf(socket);
    if (address === undefined) return undefined;
    const family = isIPv4(address) ? 'ipv4' : 'ipv6';
    return this.networks.find((n) => n.list.check(address, family))?.text;
  }

  get tokensRequired(): boolean {
    return this.digests.length > 0;
  }

  get mode(): AuthMode {
    const parts = [
      ...(this.tls?.ca ? ['mtls'] : []),
      ...(this.tokensRequired ? ['token'] : []),
      ...(this.networks.length > 0 ? ['network'] : []),
    ];
    return parts.length > 0 ? parts.join('+') : 'none';
  }

  /**
   * The caller of a new bridge connection when it is known at accept time (client certificate,
   * allowed network, or no tokens configured), or null when it must still send an AUTH frame.
   * Throws UNAUTHENTICATED or FORBIDDEN.
   */
  callerAtAccept(socket: Socket): CallContext | null {
    if (this.tokensRequired && this.networkOf(socket) === undefined) {
      this.requireClientCertificate(socket);
      return null;
    }
    return this.authenticate(undefined, socket);
  }

  /** Name of the token, or undefined when it matches none. Constant time in the token value. */
  tokenName(token: string): string | undefined {
    const presented = digest(token);
    let name: string | undefined;
    for (const entry of this.digests) {
      if (timingSafeEqual(presented, entry.digest) && name === undefined) name = entry.name;
    }
    return name;
  }

  /**
   * Checks a presented token (undefined = none) and builds the audit context of the call.
   * Throws UNAUTHENTICATED or FORBIDDEN.
   */
  authenticate(token: string | undefined, socket: Socket): CallContext {
    const network = this.networkOf(socket);
    const address = remoteAddressOf(socket);
    if (network !== undefined && (token === undefined || !this.tokensRequired)) {
      return this.context(`network:${network}`, address);
    }
    this.requireClientCertificate(socket);
    let caller: string | undefined;
    if (this.tokensRequired) {
      if (token === undefined) throw authError('UNAUTHENTICATED');
      caller = this.tokenName(token);
      if (caller === undefined) throw authError('FORBIDDEN');
    } else if (this.networks.length > 0 && !this.tls?.ca) {
      throw kmsError('FORBIDDEN', `the address ${address ?? '(unknown)'} is not in allowed_networks`);
    }
    return this.context(caller ?? this.certificateSubject(socket) ?? 'anonymous', address);
  }

  /**
   * The (frozen) context for a caller and address, shared by every request with the same pair:
   * the KMS caches audit fields by context identity, so requests from the same caller on
   * different connections share them instead of building and shipping a new set each.
   */
  private context(caller: string, remoteAddress: string | undefined): CallContext {
    const key = `${caller}\u0000${remoteAddress ?? ''}`;
    let ctx = this.contexts.get(key);
    if (ctx === undefined) {
      if (this.contexts.size >= MAX_CACHED_CONTEXTS) this.contexts.clear();
      ctx = Object.freeze({ caller, remoteAddress });
      this.contexts.set(key, ctx);
    }
    return ctx;
  }

  /** With mutual TLS, a verified client certificate comes before everything else. */
  requireClientCertificate(socket: Socket): void {
    if (!this.tls?.ca || this.networkOf(socket) !== undefined) return;
    const tlsSocket = socket as TLSSocket;
    if (tlsSocket.authorized) return;
    const cert = tlsSocket.getPeerCertificate?.();
    if (!cert || Object.keys(cert).length === 0) {
      throw kmsError('UNAUTHENTICATED', 'a client certificate is required');
    }
    throw kmsError('FORBIDDEN', 'the client certificate is not trusted');
  }

  /** Subject CN of a verified client certificate (cached per connection). */
  private certificateSubject(socket: Socket): string | undefined {
    if (!this.tls?.ca) return undefined;
    const cached = this.callerOfSocket.get(socket);
    if (cached !== undefined) return cached;
    const tlsSocket = socket as TLSSocket;
    if (!tlsSocket.authorized) return undefined;
    const cn = tlsSocket.getPeerCertificate()?.subject?.CN;
    const subject = typeof cn === 'string' && cn !== '' ? cn : 'client-certificate';
    this.callerOfSocket.set(socket, subject);
    return subject;
  }

  /** Options for tls.createServer / https.createServer, or null for plain TCP. */
  serverTlsOptions(): TlsOptions | null {
    if (!this.tls) return null;
    const mtls = this.tls.ca !== undefined;
    return {
      cert: this.tls.cert,
      key: this.tls.key,
      ...(mtls ? { ca: this.tls.ca } : {}),
      requestCert: mtls,
      // Checked per request / connection by requireClientCertificate, to answer 401/403.
      rejectUnauthorized: false,
      minVersion: 'TLSv1.2',
    };
  }
}

function authError(code: 'UNAUTHENTICATED' | 'FORBIDDEN'): CodedError {
  return code === 'UNAUTHENTICATED'
    ? kmsError(code, 'a bearer token is required')
    : kmsError(code, 'the bearer token is not valid');
}

const BEARER = /^Bearer[ \t]+(\S+)[ \t]*$/i;

/** The token of an `Authorization: Bearer T` header; a malformed header counts as a wrong token. */
export function bearerToken(header: string | undefined): string | undefined {
  if (header === undefined) return undefined;
  const m = BEARER.exec(header);
  return m?.[1] ?? '';
}
