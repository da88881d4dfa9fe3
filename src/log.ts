/**
 * One structured logger for every process (pino: fast JSON lines, redaction built in).
 * Redaction is a second line of defence: code must never hand key material or plaintext to a
 * logger in the first place.
 */
import { type Logger, pino } from 'pino';

export type { Logger };

const REDACT = [
  '*.master_key',
  '*.masterKey',
  '*.plaintext',
  '*.key',
  '*.token',
  '*.tokens',
  '*.authorization',
  'req.headers.authorization',
  '*.body',
];

export function createLogger(name: string, level = process.env.PROGRESSDB_LOG_LEVEL ?? 'info'): Logger {
  return pino({
    name,
    level,
    redact: { paths: REDACT, censor: '[redacted]' },
    base: { pid: process.pid },
  });
}

/** A logger that drops everything: the default for library use, where the caller decides. */
export const silentLogger: Logger = pino({ level: 'silent' });
