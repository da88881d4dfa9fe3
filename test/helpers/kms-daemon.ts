/**
 * Runs the real `progressdb-kms` (dist/src/cli/progressdb-kms.js, built by `npm test`'s pretest)
 * as a child process on port 0 and reads the bound ports from its "listening" log lines. Also:
 * keygen through the CLI, a small HTTP(S) request helper, and openssl-made certificates.
 * The built daemon on purpose (end-to-end tests of the shipped executable); the wire codec this
 * side uses comes from src/, since the wire format is the contract being tested.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { connect, type Socket } from 'node:net';
import path from 'node:path';
import { type Frame, FrameDecoder } from '../../src/wire/bridge-codec.js';
import { cleanEnv, until } from './processes.js';
import { type ExitInfo, KMS_CLI, runCli, tempDir } from './server.js';

const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/** A master key file made by `progressdb-kms keygen --out`. */
export async function keygen(dir: string): Promise<string> {
  const file = path.join(dir, 'master.key');
  const res = await runCli(KMS_CLI, ['keygen', '--out', file]);
  if (res.code !== 0) throw new Error(`keygen failed: ${res.stderr}`);
  return file;
}

export interface DaemonOptions {
  /** Reused across restarts; a fresh temp dir (with a keygen'd master key) when omitted. */
  dir?: string;
  /** HTTP port; 0 (any free port) when omitted. */
  httpPort?: number;
  /** Start the TCP bridge, on this port (0 = any). */
  bridgePort?: number;
  /** The flag that names the HTTP listener; '--endpoint' tests the deprecated name. */
  listenFlag?: '--listen' | '--endpoint';
  args?: string[];
  env?: Record<string, string>;
}

interface ListenLine {
  listener: string;
  port: number;
  tls: string;
  auth: string;
}

export class Daemon {
  readonly logs: string[] = [];
  stderr = '';
  readonly exited: Promise<ExitInfo>;
  gone: ExitInfo | undefined;
  httpPort = 0;
  bridgePort: number | null = null;

  constructor(
    readonly child: ChildProcess,
    readonly dir: string,
    readonly masterKeyFile: string,
  ) {
    let partial = '';
    child.stdout!.on('data', (d: Buffer) => {
      const lines = (partial + d.toString('utf8')).split('\n');
      partial = lines.pop()!;
      this.logs.push(...lines);
    });
    child.stderr!.on('data', (d: Buffer) => (this.stderr += d));
    this.exited = new Promise((resolve) =>
      child.on('exit', (code, signal) => {
        running.delete(child);
        this.gone = { code, signal };
        resolve(this.gone);
      }),
    );
  }

  get dataDir(): string {
    return path.join(this.dir, 'kms');
  }

  /** Parsed "listening" lines: one per listener. */
  listeners(): ListenLine[] {
    return this.logs.flatMap((line) => {
      try {
        const o = JSON.parse(line) as Partial<ListenLine> & { msg?: string };
        return typeof o.listener === 'string' && o.msg?.includes('listening') ? [o as ListenLine] : [];
      } catch {
        return [];
      }
    });
  }

  get http(): string {
    return `127.0.0.1:${this.httpPort}`;
  }

  get bridge(): string {
    if (this.bridgePort === null) throw new Error('no bridge listener');
    return `127.0.0.1:${this.bridgePort}`;
  }

  kill9(): Promise<ExitInfo> {
    if (!this.gone) this.child.kill('SIGKILL');
    return this.exited;
  }

  stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<ExitInfo> {
    if (!this.gone) this.child.kill(signal);
    return this.exited;
  }
}

/** Spawns the daemon; resolves once it logged its listeners (or rejects if it exits first). */
export async function spawnDaemon(opts: DaemonOptions = {}): Promise<Daemon> {
  const dir = opts.dir ?? tempDir('pdb-kmsd-');
  const masterKeyFile = path.join(dir, 'master.key');
  if (!opts.dir) await keygen(dir);
  const args = [
    KMS_CLI,
    'serve',
    opts.listenFlag ?? '--listen',
    `127.0.0.1:${opts.httpPort ?? 0}`,
    '--data-dir',
    path.join(dir, 'kms'),
    '--master-key-file',
    masterKeyFile,
    ...(opts.bridgePort !== undefined ? ['--bridge-endpoint', `127.0.0.1:${opts.bridgePort}`] : []),
    ...(opts.args ?? []),
  ];
  const child = spawn(process.execPath, args, {
    // destroy_dek destroys at once unless a test sets a deletion window.
    env: cleanEnv({ PROGRESSDB_KMS_POOL_SIZE: '1', PROGRESSDB_KMS_DELETION_WINDOW: '0', ...opts.env }),
    cwd: dir,
  });
  running.add(child);
  const daemon = new Daemon(child, dir, masterKeyFile);
  const wanted = opts.bridgePort !== undefined ? 2 : 1;
  await until(
    'the KMS daemon listeners',
    () => {
      if (daemon.gone) {
        throw new Error(
          `progressdb-kms exited (${daemon.gone.code ?? daemon.gone.signal}): ${daemon.stderr}`,
        );
      }
      const lines = daemon.listeners();
      return lines.length >= wanted ? lines : undefined;
    },
    20_000,
  );
  for (const l of daemon.listeners()) {
    if (l.listener === 'http') daemon.httpPort = l.port;
    else daemon.bridgePort = l.port;
  }
  return daemon;
}

/** Runs the daemon expecting it to refuse to start; resolves with its exit code and stderr. */
export async function daemonRefuses(args: string[], env: Record<string, string> = {}) {
  return runCli(KMS_CLI, ['serve', ...args], { env: cleanEnv(env), timeoutMs: 20_000 });
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

export interface TlsClient {
  ca?: string;
  cert?: string;
  key?: string;
}

export interface HttpReply {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  // biome-ignore lint/suspicious/noExplicitAny: test assertions index into arbitrary JSON
  json: any;
}

export function request(
  base: string,
  pathAndQuery: string,
  opts: {
    method?: string;
    headers?: Record<string, string>;
    body?: string | Buffer;
    tls?: TlsClient;
    /** Source address of the connection (any 127/8 address works on Linux loopback). */
    localAddress?: string;
  } = {},
): Promise<HttpReply> {
  const url = new URL(pathAndQuery, base);
  const mod = url.protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    const req = mod.request(
      url,
      {
        method: opts.method ?? 'GET',
        headers: opts.headers,
        agent: false,
        ...(opts.localAddress ? { localAddress: opts.localAddress } : {}),
        ...(opts.tls ?? {}),
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: unknown;
          try {
            json = JSON.parse(text);
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(opts.body);
  });
}

/** POST a JSON body (object → JSON) with the right content type. */
export function postJson(
  base: string,
  route: string,
  body: unknown,
  opts: { headers?: Record<string, string>; tls?: TlsClient; localAddress?: string } = {},
): Promise<HttpReply> {
  return request(base, route, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...opts.headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
    ...(opts.tls ? { tls: opts.tls } : {}),
    ...(opts.localAddress ? { localAddress: opts.localAddress } : {}),
  });
}

export const b64 = (s: string | Buffer) => Buffer.from(s).toString('base64');

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

export interface Pki {
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** A client certificate from another CA: must be refused. */
  rogueCert: string;
  rogueKey: string;
  /** File paths for the daemon's flags. */
  files: { caCert: string; serverCert: string; serverKey: string };
}

function openssl(dir: string, args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
}

/** A new P-256 key written to `name.key`, with the subject CN. */
const newKey = (name: string, cn: string) => [
  '-newkey',
  'ec',
  '-pkeyopt',
  'ec_paramgen_curve:P-256',
  '-nodes',
  '-keyout',
  `${name}.key`,
  '-subj',
  `/CN=${cn}`,
];

function issue(dir: string, name: string, cn: string, ca: string, ext: string): void {
  openssl(dir, ['req', ...newKey(name, cn), '-out', `${name}.csr`]);
  writeFileSync(path.join(dir, `${name}.ext`), ext);
  const signer = ['-CA', `${ca}.crt`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-extfile', `${name}.ext`];
  openssl(dir, ['x509', '-req', '-in', `${name}.csr`, ...signer, '-out', `${name}.crt`, '-days', '2']);
}

function selfSignedCa(dir: string, name: string, cn: string): void {
  openssl(dir, ['req', '-x509', ...newKey(name, cn), '-out', `${name}.crt`, '-days', '2']);
}

/** A CA, a server certificate for 127.0.0.1, a client certificate, and a rogue client certificate. */
export function makePki(): Pki {
  const dir = tempDir('pdb-pki-');
  selfSignedCa(dir, 'ca', 'progressdb test CA');
  selfSignedCa(dir, 'rogue-ca', 'rogue CA');
  issue(
    dir,
    'server',
    'progressdb-kms',
    'ca',
    'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n',
  );
  issue(dir, 'client', 'app-server-1', 'ca', 'extendedKeyUsage=clientAuth\n');
  issue(dir, 'rogue', 'intruder', 'rogue-ca', 'extendedKeyUsage=clientAuth\n');
  const read = (f: string) => readFileSync(path.join(dir, f), 'utf8');
  return {
    dir,
    caCert: read('ca.crt'),
    serverCert: read('server.crt'),
    serverKey: read('server.key'),
    clientCert: read('client.crt'),
    clientKey: read('client.key'),
    rogueCert: read('rogue.crt'),
    rogueKey: read('rogue.key'),
    files: {
      caCert: path.join(dir, 'ca.crt'),
      serverCert: path.join(dir, 'server.crt'),
      serverKey: path.join(dir, 'server.key'),
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Raw bridge connections
// ---------------------------------------------------------------------------------------------

/** A raw TCP connection to the bridge that collects decoded frames, for protocol-level tests. */
export class BridgeSocket {
  readonly frames: Frame[] = [];
  readonly closed: Promise<void>;
  private readonly socket: Socket;
  private readonly decoder = new FrameDecoder(64 * 1024 * 1024);

  isClosed = false;

  constructor(port: number, localAddress?: string) {
    this.socket = connect({ host: '127.0.0.1', port, ...(localAddress ? { localAddress } : {}) });
    this.socket.on('data', (chunk: Buffer) => this.decoder.push(chunk, (f) => this.frames.push(f)));
    this.socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      this.socket.on('close', () => {
        this.isClosed = true;
        resolve();
      }),
    );
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  end(): void {
    this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Waits until `n` frames arrived (or the connection closed with fewer). */
  async waitFrames(n: number, ms = 10_000): Promise<Frame[]> {
    let isClosed = false;
    void this.closed.then(() => (isClosed = true));
    await until(`${n} bridge frames`, () => (this.frames.length >= n || isClosed ? true : undefined), ms);
    return this.frames;
  }

  /** The frame answering request `id`. */
  async answer(id: number): Promise<Frame> {
    return until(`answer to ${id}`, () => this.frames.find((f) => f.id === id));
  }
}
