/**
 * Runs the real built executables (`dist/src/cli/*.js`) as child processes on loopback ports and
 * talks to them over HTTP only. Every wait polls with a deadline; nothing sleeps for a fixed time.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { generateMasterKeyFile } from '../../src/kms/index.js';
import { cleanEnv, freePort, until } from './processes.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// The built executables on purpose: these are end-to-end tests of what `npm install` ships (bin
// entries, worker files, start-up), while in-process tests import src/ through tsx.
export const SERVER_CLI = path.join(ROOT, 'dist/src/cli/progressdb.js');
export const KMS_CLI = path.join(ROOT, 'dist/src/cli/progressdb-kms.js');

export function tempDir(prefix = 'pdb-test-'): string {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Runs a CLI to completion and returns what it printed. */
export async function runCli(
  cli: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string; timeoutMs?: number } = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [cli, ...args], {
    env: opts.env ?? cleanEnv(),
    cwd: opts.cwd ?? ROOT,
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d));
  child.stderr.on('data', (d: Buffer) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 20_000);
  // 'close', not 'exit': 'exit' can come before the last of stderr is read (seen under load: a
  // refusal's message missing from a failed restore).
  const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
  clearTimeout(timer);
  return { code, stdout, stderr };
}

/** Whatever JSON.parse returns: replies are checked field by field by the tests. */
export type Json = ReturnType<typeof JSON.parse>;

export interface Reply<T = Json> {
  status: number;
  body: T;
  text: string;
}

export class Client {
  constructor(
    readonly url: string,
    readonly key: string | undefined,
  ) {}

  withKey(key: string | undefined): Client {
    return new Client(this.url, key);
  }

  async request<T = Json>(
    method: string,
    urlPath: string,
    opts: { json?: unknown; raw?: string | Buffer; headers?: Record<string, string> } = {},
  ): Promise<Reply<T>> {
    const headers: Record<string, string> = { ...opts.headers };
    if (this.key !== undefined) headers.authorization = `Bearer ${this.key}`;
    let body: string | Buffer | undefined;
    if (opts.json !== undefined) {
      body = JSON.stringify(opts.json);
      headers['content-type'] ??= 'application/json';
    } else if (opts.raw !== undefined) {
      body = opts.raw;
    }
    const res = await fetch(`${this.url}${urlPath}`, {
      method,
      headers,
      ...(body !== undefined && { body }),
    });
    const text = await res.text();
    let parsed: Json = null;
    if (text !== '') {
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = null;
      }
    }
    return { status: res.status, body: parsed, text };
  }

  get<T = Json>(p: string) {
    return this.request<T>('GET', p);
  }
  post<T = Json>(p: string, json?: unknown) {
    return this.request<T>('POST', p, json === undefined ? {} : { json });
  }
  put<T = Json>(p: string, json: unknown) {
    return this.request<T>('PUT', p, { json });
  }
  delete<T = Json>(p: string) {
    return this.request<T>('DELETE', p);
  }

  async createThread(title = 't'): Promise<string> {
    const r = await this.post('/v1/threads', { title });
    if (r.status !== 201) throw new Error(`create thread: ${r.status} ${r.text}`);
    return r.body.id as string;
  }

  async postMessage(threadId: string, body: unknown): Promise<Reply> {
    return this.post(`/v1/threads/${threadId}/messages`, { body });
  }

  /** Every message of a thread, newest first, following cursors. */
  async allMessages(threadId: string, limit = 200): Promise<Json[]> {
    const out: Json[] = [];
    let cursor: string | null = null;
    do {
      const r: Reply = await this.get(
        `/v1/threads/${threadId}/messages?limit=${limit}${cursor ? `&cursor=${cursor}` : ''}`,
      );
      if (r.status !== 200) throw new Error(`list messages: ${r.status} ${r.text}`);
      out.push(...r.body.messages);
      cursor = r.body.next_cursor;
    } while (cursor);
    return out;
  }
}

export interface ServerOptions {
  dataDir?: string;
  /** 'embedded' (default, with a master key file in the data dir), 'external' or 'off'. */
  mode?: 'embedded' | 'external' | 'off';
  kmsEndpoint?: string;
  env?: Record<string, string>;
  /** Reuse the keys of a previous run on the same data dir. */
  keys?: { api: string; admin: string };
}

export class ServerProcess {
  readonly api: Client;
  readonly admin: Client;
  private exited: Promise<ExitInfo>;

  constructor(
    readonly child: ChildProcess,
    readonly url: string,
    readonly dataDir: string,
    readonly options: ServerOptions & { keys: { api: string; admin: string } },
    exited: Promise<ExitInfo>,
    readonly output: { stdout: string; stderr: string },
  ) {
    this.api = new Client(url, options.keys.api);
    this.admin = new Client(url, options.keys.admin);
    this.exited = exited;
  }

  /** Graceful stop (SIGTERM); resolves with how the process ended. */
  async stop(): Promise<ExitInfo> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    return this.exited;
  }

  async kill9(): Promise<ExitInfo> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    return this.exited;
  }

  /** Starts a new server process on the same data dir and keys. */
  restart(extra: Partial<ServerOptions> = {}): Promise<ServerProcess> {
    return startServer({ ...this.options, ...extra, dataDir: this.dataDir });
  }
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of running) c.kill('SIGKILL');
});

function serverEnv(dataDir: string, opts: ServerOptions, keys: { api: string; admin: string }) {
  const mode = opts.mode ?? 'embedded';
  return cleanEnv({
    PROGRESSDB_ADDR: '127.0.0.1:0',
    PROGRESSDB_DATA_DIR: dataDir,
    PROGRESSDB_API_KEYS: `tester:${keys.api}`,
    PROGRESSDB_ADMIN_KEY: keys.admin,
    PROGRESSDB_USE_ENCRYPTION: mode === 'off' ? 'false' : 'true',
    PROGRESSDB_KMS_MODE: mode === 'external' ? 'external' : 'embedded',
    // One crypto worker per server: several servers share this 2-core machine during tests.
    PROGRESSDB_KMS_POOL_SIZE: '1',
    // Deleting a thread crypto-shreds its key at once, as the tests of that expect; the deletion
    // window has its own tests.
    PROGRESSDB_KMS_DELETION_WINDOW: '0',
    ...(mode === 'embedded' && { PROGRESSDB_KMS_MASTER_KEY_FILE: path.join(dataDir, 'master.key') }),
    ...(mode === 'external' && opts.kmsEndpoint && { PROGRESSDB_KMS_ENDPOINT: opts.kmsEndpoint }),
    ...opts.env,
  });
}

export async function startServer(opts: ServerOptions = {}): Promise<ServerProcess> {
  const dataDir = opts.dataDir ?? tempDir();
  const keys = opts.keys ?? {
    api: randomBytes(18).toString('base64url'),
    admin: randomBytes(18).toString('base64url'),
  };
  const masterKey = path.join(dataDir, 'master.key');
  if ((opts.mode ?? 'embedded') === 'embedded' && !exists(masterKey)) await generateMasterKeyFile(masterKey);

  const child = spawn(process.execPath, [SERVER_CLI], { env: serverEnv(dataDir, opts, keys), cwd: dataDir });
  running.add(child);
  const output = { stdout: '', stderr: '' };
  const exited = new Promise<ExitInfo>((resolve) =>
    child.on('exit', (code, signal) => {
      running.delete(child);
      resolve({ code, signal });
    }),
  );
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${output.stderr}`)), 20_000);
    let pending = '';
    child.stdout!.on('data', (d: Buffer) => {
      output.stdout += d;
      pending += d;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        try {
          const entry = JSON.parse(line) as { msg?: string; url?: string };
          if (entry.msg === 'progressdb listening' && entry.url) {
            clearTimeout(timer);
            resolve(entry.url);
          }
        } catch {
          // not a log line
        }
      }
    });
    child.stderr!.on('data', (d: Buffer) => (output.stderr += d));
    void exited.then((e) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${e.code ?? e.signal}) before listening:\n${output.stderr}`));
    });
  });
  return new ServerProcess(child, url, dataDir, { ...opts, keys }, exited, output);
}

export function exists(p: string): boolean {
  try {
    statSync(p);
    return true;
  } catch {
    return false;
  }
}

/** Every file under `dir` (recursively) whose bytes contain `marker`. */
export function filesContaining(dir: string, marker: string): string[] {
  const needle = Buffer.from(marker);
  const hits: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const file = path.join(entry.parentPath, entry.name);
    if (readFileSync(file).includes(needle)) hits.push(file);
  }
  return hits;
}

// ---------------------------------------------------------------------------------------------
// external KMS daemon

export class KmsDaemon {
  private exited: Promise<ExitInfo>;
  constructor(
    readonly child: ChildProcess,
    readonly endpoint: string,
    readonly dataDir: string,
    readonly port: number,
    exited: Promise<ExitInfo>,
    readonly output: { stderr: string },
  ) {
    this.exited = exited;
  }

  async kill9(): Promise<ExitInfo> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    return this.exited;
  }

  async stop(): Promise<ExitInfo> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    return this.exited;
  }

  restart(): Promise<KmsDaemon> {
    return startKmsDaemon({ dataDir: this.dataDir, port: this.port });
  }
}

/** Starts `progressdb-kms serve` with its own data dir and master key; waits for /healthz. */
export async function startKmsDaemon(opts: { dataDir?: string; port?: number } = {}): Promise<KmsDaemon> {
  const dataDir = opts.dataDir ?? tempDir('pdb-kms-');
  const masterKey = path.join(dataDir, 'master.key');
  if (!exists(masterKey)) await generateMasterKeyFile(masterKey);
  const port = opts.port ?? (await freePort());
  const endpoint = `127.0.0.1:${port}`;
  const child = spawn(
    process.execPath,
    [
      KMS_CLI,
      'serve',
      '--listen',
      endpoint,
      '--data-dir',
      path.join(dataDir, 'kms'),
      '--master-key-file',
      masterKey,
    ],
    { env: cleanEnv({ PROGRESSDB_KMS_POOL_SIZE: '1' }), cwd: dataDir },
  );
  running.add(child);
  const output = { stderr: '' };
  child.stderr!.on('data', (d: Buffer) => (output.stderr += d));
  child.stdout!.resume();
  let gone: ExitInfo | undefined;
  const exited = new Promise<ExitInfo>((resolve) =>
    child.on('exit', (code, signal) => {
      running.delete(child);
      gone = { code, signal };
      resolve(gone);
    }),
  );
  await until('the KMS daemon', async () => {
    if (gone) throw new Error(`progressdb-kms exited (${gone.code ?? gone.signal}):\n${output.stderr}`);
    try {
      const res = await fetch(`http://${endpoint}/healthz`);
      await res.arrayBuffer();
      return res.status === 200 ? true : undefined;
    } catch {
      return undefined;
    }
  });
  return new KmsDaemon(child, endpoint, dataDir, port, exited, output);
}
