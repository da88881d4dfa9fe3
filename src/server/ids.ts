/**
 * Time-ordered ids (ULID layout: 48-bit millisecond time + 80 random bits, Crockford base32, 26
 * characters). Ids from one process are strictly increasing, even within one millisecond or when the
 * clock steps back, so "newest first" is plain reverse key order in LMDB.
 */
import { randomBytes } from 'node:crypto';

const ALPHABET = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
export const ID_PATTERN = /^[0-9A-HJKMNP-TV-Z]{26}$/;

export class IdGenerator {
  private lastTime = 0;
  /** The 80 random bits as 16 base32 digits (5 bits each), incremented for ids in the same ms. */
  private readonly random = new Uint8Array(16);

  next(now = Date.now()): string {
    if (now > this.lastTime) {
      this.lastTime = now;
      const bytes = randomBytes(16);
      // Keep the top digit below 16 so increments within one millisecond cannot overflow in practice.
      // In bounds: bytes and this.random both hold 16 bytes.
      for (let i = 0; i < 16; i++) this.random[i] = (bytes[i] as number) & (i === 0 ? 0x0f : 0x1f);
    } else {
      this.increment();
    }
    let out = '';
    let t = this.lastTime;
    const timeDigits = new Array<string>(10);
    for (let i = 9; i >= 0; i--) {
      timeDigits[i] = ALPHABET.charAt(t % 32);
      t = Math.floor(t / 32);
    }
    out = timeDigits.join('');
    for (const d of this.random) out += ALPHABET[d];
    return out;
  }

  private increment(): void {
    for (let i = 15; i >= 0; i--) {
      // In bounds: i runs over the 16 bytes of this.random.
      if ((this.random[i] as number) < 31) {
        this.random[i] = (this.random[i] as number) + 1;
        return;
      }
      this.random[i] = 0;
    }
    // 2^79 ids in one millisecond cannot happen; move to the next millisecond rather than wrap.
    this.lastTime++;
  }
}
