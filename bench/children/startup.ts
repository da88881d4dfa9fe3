/**
 * Issue-5 case 8, in its own process so nothing is cached: times createKms() on an existing data
 * dir and reports the resident set size once it is ready. Args: DATA_DIR MASTER_KEY_FILE.
 * Prints one JSON line: {"startMs","rssBytes","heapUsedBytes","dekCount","sinceProcessStartMs"}.
 */
import { createKms } from '../product.js';

const [dataDir, masterKeyFile] = process.argv.slice(2);
if (dataDir === undefined || masterKeyFile === undefined) {
  process.stderr.write('usage: startup DATA_DIR MASTER_KEY_FILE\n');
  process.exit(2);
}
const t0 = performance.now();
const kms = await createKms({ dataDir, masterKeyFile, resumeRotation: false });
const health = await kms.health();
const startMs = performance.now() - t0;
const sinceProcessStartMs = performance.now();
const mem = process.memoryUsage();
process.stdout.write(
  `${JSON.stringify({ startMs, rssBytes: mem.rss, heapUsedBytes: mem.heapUsed, dekCount: health.dekCount, sinceProcessStartMs })}\n`,
);
await kms.close();
