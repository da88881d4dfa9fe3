/**
 * Nesting depth of a JSON text, checked before it is parsed: a body nested thousands of levels
 * deep parses fine but overflows the stack of every recursive walk after it (JSON.stringify,
 * the store's encoder), so it is refused up front. One linear pass over the bytes: brackets are
 * counted outside strings, and each string is skipped with indexOf (memchr), so a body that is
 * mostly base64 costs little more than a search for its quotes.
 */
const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPEN_BRACE = 0x7b;
const OPEN_BRACKET = 0x5b;
const CLOSE_BRACE = 0x7d;
const CLOSE_BRACKET = 0x5d;

/** Byte class: 0 nothing to do, 1 opens, 2 closes, 3 starts a string (one load per byte). */
const CLASS = new Uint8Array(256);
CLASS[OPEN_BRACE] = CLASS[OPEN_BRACKET] = 1;
CLASS[CLOSE_BRACE] = CLASS[CLOSE_BRACKET] = 2;
CLASS[QUOTE] = 3;

/**
 * True when `bytes` (UTF-8 JSON; multi-byte sequences never contain ASCII bytes) opens more than
 * `maxDepth` objects or arrays inside each other. Malformed text is left for the parser to refuse.
 */
export function jsonDepthExceeds(bytes: Uint8Array, maxDepth: number): boolean {
  const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const end = buf.length;
  let depth = 0;
  // In bounds: i and j stay below buf.length, and CLASS has an entry for every byte value.
  for (let i = 0; i < end; i++) {
    const c = CLASS[buf[i] as number] as number;
    if (c === 0) continue;
    if (c === 3) {
      // Skip the string. Short ones byte by byte; past a few bytes, jump from quote to quote
      // with indexOf (memchr) until one is not escaped (an even number of backslashes before it).
      let j = i + 1;
      const scanEnd = Math.min(end, j + 16);
      while (j < scanEnd) {
        const d = buf[j] as number;
        if (d === QUOTE) break;
        j += d === BACKSLASH ? 2 : 1;
      }
      if (j >= scanEnd) {
        for (;;) {
          j = buf.indexOf(QUOTE, j);
          if (j === -1) return false;
          let slashes = 0;
          while (buf[j - 1 - slashes] === BACKSLASH) slashes++;
          if ((slashes & 1) === 0) break;
          j++;
        }
      }
      i = j;
    } else if (c === 1) {
      if (++depth > maxDepth) return true;
    } else {
      depth--;
    }
  }
  return false;
}
