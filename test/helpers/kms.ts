/**
 * Helpers for the embedded KMS tests: temp dirs, master key files, a KMS that closes itself at
 * teardown, error assertions, audit log reading, stdout capture and child processes that run a
 * small TypeScript script against the KMS (for kill -9, file-size limits and heap snapshots).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { ExecutionContext } from 'ava';
import type { Kms } from '../../src/api/index.js';
import { type ErrorCode, ServiceError, statusOf, UserError } from '../../src/errors.js';
import { createKms, type EmbeddedKmsHandle, type KmsOptions } from '../../src/kms/index.js';
import { unwrapKeyInto } from '../../workers/aead.js';

/** Repository root (children run with it as cwd so that `--import=tsx` resolves). */
export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
/** file: URL of the KMS entry module, for child scripts written to temp dirs. */
export const KMS_MODULE = pathToFileURL(path.join(ROOT, 'src/kms/index.ts')).href;

/** A fresh temp dir, removed when the test ends. */
export function tempDir(t: ExecutionContext, prefix = 'pdb-kms-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function randomKeyHex(): string {
  return randomBytes(32).toString('hex');
}

/** Writes a master key file (mode 0600) holding `hex` (random by default). */
export function writeMasterKey(
  dir: string,
  hex = randomKeyHex(),
  name = 'master.key',
): { file: string; hex: string } {
  const file = path.join(dir, name);
  fs.writeFileSync(file, `${hex}\n`, { mode: 0o600 });
  return { file, hex };
}

export interface KmsFixture {
  kms: EmbeddedKmsHandle;
  dir: string;
  dataDir: string;
  keyFile: string;
  keyHex: string;
  /** Opens the same data dir again (after `kms.close()`), closed at teardown too. */
  reopen(extra?: KmsOptions): Promise<EmbeddedKmsHandle>;
}

/** A clock for the KMS's scheduled work that moves only when told to; checks every 10 ms. */
export function manualClock(start = Date.now()) {
  let now = start;
  return {
    now: () => now,
    checkEveryMs: 10,
    advance(ms: number) {
      now += ms;
    },
  };
}

/** A KMS on its own temp dir with a random master key file; closed at teardown. */
export async function openKms(t: ExecutionContext, options: KmsOptions = {}): Promise<KmsFixture> {
  const dir = tempDir(t);
  const { file, hex } = writeMasterKey(dir);
  const dataDir = path.join(dir, 'kms');
  // destroyDek destroys at once unless a test sets a deletion window.
  const base: KmsOptions = { dataDir, masterKeyFile: file, poolSize: 1, deletionWindow: 0, ...options };
  const open = async (extra: KmsOptions = {}) => {
    const kms = await createKms({ ...base, ...extra });
    t.teardown(() => kms.close());
    return kms;
  };
  const kms = await open();
  return { kms, dir, dataDir, keyFile: file, keyHex: hex, reopen: open };
}

/**
 * Asserts that `promise` rejects with a CodedError of `code`, of the right class (UserError for
 * 4xx, ServiceError for 5xx) and with the catalogue status. Returns the error.
 */
export async function expectCode(
  t: ExecutionContext,
  promise: Promise<unknown>,
  code: ErrorCode,
  message?: string,
): Promise<UserError | ServiceError | undefined> {
  const status = statusOf(code);
  const err = await t.throwsAsync(promise, { code }, message);
  if (err === undefined) return undefined;
  t.true(err instanceof (status < 500 ? UserError : ServiceError), `${message ?? code}: error class`);
  t.is((err as UserError).status, status, message);
  return err as UserError | ServiceError;
}

export interface AuditLine {
  v: number;
  ts: string;
  s: string;
  n: number;
  op: string;
  outcome: 'ok' | 'error';
  code?: string;
  /** How many operations the line stands for (audit_data_ops: aggregate). */
  count?: number;
  key_id?: string;
  thread_id?: string;
  kek_version?: string;
  caller?: string;
  remote?: string;
  detail?: string;
  mac?: string;
}

export function auditPath(dataDir: string): string {
  return path.join(dataDir, 'kms-audit.log');
}

/** The audit log's raw lines (without the trailing empty one). */
export function auditText(dataDir: string): string[] {
  const lines = fs.readFileSync(auditPath(dataDir), 'utf8').split('\n');
  if (lines.at(-1) === '') lines.pop();
  return lines;
}

export function auditLines(dataDir: string): AuditLine[] {
  return auditText(dataDir).map((line) => JSON.parse(line) as AuditLine);
}

/**
 * Runs `fn` while collecting what it writes to process.stdout (and not passing it on). Only for
 * short synchronous-ish calls: concurrent writers in the same process would be captured too.
 */
export async function captureStdout<T>(fn: () => Promise<T>): Promise<{ result: T; out: string }> {
  const original = process.stdout.write;
  let out = '';
  process.stdout.write = ((chunk: string | Uint8Array) => {
    out += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    return true;
  }) as typeof process.stdout.write;
  try {
    const result = await fn();
    return { result, out };
  } finally {
    process.stdout.write = original;
  }
}

/**
 * Writes a child script (ESM TypeScript, `.mts` so it is a module outside the package) into
 * `dir`. `KMS_MODULE` in the source is replaced by the KMS entry URL.
 */
export function writeScript(dir: string, name: string, source: string): string {
  const file = path.join(dir, `${name}.mts`);
  fs.writeFileSync(file, source.replaceAll('KMS_MODULE', KMS_MODULE));
  return file;
}

export interface Child {
  pid: number;
  /** Everything written to stdout so far. */
  stdout(): string;
  stderr(): string;
  kill(signal: NodeJS.Signals): void;
  exited: Promise<ChildExit>;
}

export interface ChildExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Starts `node --import=tsx <script> ...args` from the repo root; killed at teardown if still alive. */
export function startChild(t: ExecutionContext, script: string, args: string[] = []): Child {
  return startProcess(t, process.execPath, ['--import=tsx', script, ...args]);
}

/** Starts any command from the repo root; killed at teardown if still alive. */
export function startProcess(t: ExecutionContext, command: string, args: string[]): Child {
  const child = spawn(command, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const exited = new Promise<ChildExit>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return {
    pid: child.pid!,
    stdout: () => stdout,
    stderr: () => stderr,
    kill: (signal) => child.kill(signal),
    exited,
  };
}

/** Runs a child script to completion and returns its stdout; throws on a non-zero exit. */
export async function runChild(t: ExecutionContext, script: string, args: string[] = []): Promise<string> {
  return checkExit(path.basename(script), await startChild(t, script, args).exited);
}

/** Runs a command to completion and returns its stdout; throws on a non-zero exit. */
export async function runProcess(t: ExecutionContext, command: string, args: string[]): Promise<string> {
  return checkExit(command, await startProcess(t, command, args).exited);
}

function checkExit(what: string, result: ChildExit): string {
  if (result.code !== 0) throw new Error(`${what} exited ${result.code ?? result.signal}: ${result.stderr}`);
  return result.stdout;
}

/** Encrypts `count` messages `${prefix}${i}` concurrently, decrypts them all, returns the plaintexts. */
export async function sealAndOpen(kms: Kms, keyId: string, count: number, prefix: string): Promise<string[]> {
  const sealed = await Promise.all(
    Array.from({ length: count }, (_, i) => kms.encrypt(keyId, Buffer.from(`${prefix}${i}`))),
  );
  const opened = await Promise.all(sealed.map((s) => kms.decrypt(keyId, s.ciphertext)));
  return opened.map((b) => b.toString());
}

/** What sealAndOpen returns when every message made the round trip. */
export const sealedMessages = (count: number, prefix: string) =>
  Array.from({ length: count }, (_, i) => `${prefix}${i}`);

/** A message sealed under its own thread's DEK, with the key id as its AAD. */
export interface Sealed {
  keyId: string;
  ciphertext: Buffer;
  plaintext: string;
}

/** Creates `count` threads `${prefix}-${i}` and seals one message under each one's DEK. */
export async function sealSome(kms: Kms, count: number, prefix: string): Promise<Sealed[]> {
  return Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const { keyId } = await kms.createDekForThread(`${prefix}-${i}`);
      const plaintext = `${prefix} message ${i}`;
      const { ciphertext } = await kms.encrypt(keyId, Buffer.from(plaintext), Buffer.from(keyId));
      return { keyId, ciphertext, plaintext };
    }),
  );
}

/** Asserts that every sealed message opens on `kms` to its plaintext. */
export async function allDecrypt(
  t: ExecutionContext,
  kms: Kms,
  sealed: Sealed[],
  label?: string,
): Promise<void> {
  const opened = await Promise.all(
    sealed.map((s) => kms.decrypt(s.keyId, s.ciphertext, Buffer.from(s.keyId)).then((b) => b.toString())),
  );
  t.deepEqual(
    opened,
    sealed.map((s) => s.plaintext),
    label,
  );
}

/** Unwraps a stored wrapped key (either format) into a new buffer: tests that inspect what is stored. */
export function unwrapKey(
  wrappingKey: Uint8Array,
  kind: number,
  wrappingVersion: number,
  identity: string,
  wrapped: Uint8Array,
): Buffer {
  const key = Buffer.alloc(32);
  unwrapKeyInto(wrappingKey, kind, wrappingVersion, identity, wrapped, key);
  return key;
}
