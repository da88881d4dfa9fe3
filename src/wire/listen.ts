/**
 * Binding a listener, shared by the KMS daemon and the ProgressDB server: a failed bind becomes a
 * start-up error with a stable code that names the address and says why, instead of a raw errno
 * surfacing as INTERNAL.
 */
import type { AddressInfo, Server } from 'node:net';
import { type CodedError, kmsError } from '../errors.js';
import { formatHostPort } from './endpoint.js';

const REASONS: Record<string, string> = {
  EADDRINUSE: 'the address is already in use (another process listens on it)',
  EACCES: 'permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)',
  EADDRNOTAVAIL: 'the address is not assigned to this machine',
  ENOTFOUND: 'the host name does not resolve',
  EAI_AGAIN: 'the host name cannot be resolved now',
};

/** ADDRESS_IN_USE for a busy port, LISTEN_FAILED for any other bind failure; `what` names the listener. */
export function listenError(what: string, host: string, port: number, err: unknown): CodedError {
  const errno = (err as NodeJS.ErrnoException | undefined)?.code;
  const reason = (errno !== undefined && REASONS[errno]) || 'the operating system refused it';
  return kmsError(
    errno === 'EADDRINUSE' ? 'ADDRESS_IN_USE' : 'LISTEN_FAILED',
    `cannot listen on ${what} ${formatHostPort(host, port)}: ${reason}${errno ? ` (${errno})` : ''}`,
    errno ? { errno } : undefined,
  );
}

/** Binds `server` to host:port; resolves with the bound address, rejects with listenError. */
export function listenOn(server: Server, host: string, port: number, what: string): Promise<AddressInfo> {
  return new Promise((resolve, reject) => {
    const fail = (err: unknown) => reject(listenError(what, host, port, err));
    server.once('error', fail);
    server.listen(port, host, () => {
      server.off('error', fail);
      resolve(server.address() as AddressInfo);
    });
  });
}
