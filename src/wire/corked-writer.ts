/**
 * Coalesces the frames written to a socket within one tick (or, with `'immediate'`, one turn of
 * the event loop) into one socket write: pipelined requests and answers cost one syscall and one
 * pass through the stream machinery per flush, not one per frame. Small frames are copied into
 * one buffer (a memcpy is far cheaper than a stream write per frame); when the batch is large
 * they are handed over corked instead, so big payloads are not copied twice.
 */
import type { Socket } from 'node:net';

/** Above this many queued bytes, frames are written corked (writev) rather than concatenated. */
const CONCAT_MAX_BYTES = 256 * 1024;

export type FlushWhen = 'tick' | 'immediate';

export class CorkedWriter {
  private frames: Buffer[] = [];
  private bytes = 0;
  private scheduled = false;
  private readonly flush = () => {
    this.scheduled = false;
    const frames = this.frames;
    const bytes = this.bytes;
    this.frames = [];
    this.bytes = 0;
    const socket = this.socket;
    if (frames.length === 0 || socket.destroyed || socket.writableEnded) return;
    if (frames.length === 1) socket.write(frames[0] as Buffer);
    else if (bytes <= CONCAT_MAX_BYTES) socket.write(Buffer.concat(frames, bytes));
    else {
      socket.cork();
      for (const frame of frames) socket.write(frame);
      socket.uncork();
    }
  };

  constructor(
    private readonly socket: Socket,
    private readonly when: FlushWhen = 'tick',
  ) {}

  /**
   * Queues a frame. Returns false while the socket's buffer is full (wait for 'drain'), like
   * socket.write: only a real write that returned false makes it false, so 'drain' always follows.
   */
  write(frame: Buffer): boolean {
    this.frames.push(frame);
    this.bytes += frame.length;
    if (!this.scheduled) {
      this.scheduled = true;
      if (this.when === 'tick') process.nextTick(this.flush);
      else setImmediate(this.flush);
    }
    return !this.socket.writableNeedDrain;
  }

  /** Writes what is queued now (before end(), so the last answers are not lost). */
  flushNow(): void {
    if (this.scheduled) this.flush();
  }
}
