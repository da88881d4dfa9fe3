/**
 * Baseline for issue-5 case 3: a bare Koa app that reads a JSON body, parses it and sends it back,
 * on the same node:http settings as the KMS daemon. Prints {"port":N} when listening; SIGTERM
 * stops it.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import Koa from 'koa';

const app = new Koa();
app.use(async (ctx) => {
  const chunks: Buffer[] = [];
  for await (const chunk of ctx.req) chunks.push(chunk as Buffer);
  ctx.body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
});

const server = http.createServer(
  { keepAliveTimeout: 65_000, headersTimeout: 20_000, requestTimeout: 60_000 },
  app.callback(),
);
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`);
});
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
