/**
 * Coalesces the frames written to a socket within one tick into one write (cork now, uncork on
 * the next tick): pipelined requests and answers cost one syscall per tick, not one per frame.
 */
import type { Socket } from 'node:net';

export class CorkedWriter {
  private corked = false;
  private readonly uncork = () => {
    this.corked = false;
    this.socket.uncork();
  };

  constructor(private readonly socket: Socket) {}

  /** Returns false when the socket's buffer is full (wait for 'drain'), like socket.write. */
  write(frame: Buffer): boolean {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    return this.socket.write(frame);
  }
}
