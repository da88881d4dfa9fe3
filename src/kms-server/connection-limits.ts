/**
 * Per-remote-address connection limit, one instance per listener: an address at its limit gets
 * its new connection closed at once, so a few hosts (or one misbehaving client) cannot take every
 * slot of `max_connections`.
 */
import type { Socket } from 'node:net';
import { remoteAddressOf } from './auth.js';

export class PerAddressLimit {
  readonly #open = new Map<string, number>();

  constructor(readonly max: number) {}

  /** Counts the socket against its address until it closes; false (not counted) at the limit. */
  admit(socket: Socket): boolean {
    const address = remoteAddressOf(socket) ?? '';
    const open = this.#open.get(address) ?? 0;
    if (open >= this.max) return false;
    this.#open.set(address, open + 1);
    socket.once('close', () => {
      const left = (this.#open.get(address) ?? 1) - 1;
      if (left === 0) this.#open.delete(address);
      else this.#open.set(address, left);
    });
    return true;
  }
}
