/**
 * The one configuration layering of the server, the daemon and the library options: a setting
 * comes from a flag, else the environment, else the config file, else its default, and each value
 * keeps its origin so problems and start-up logs can name where it came from. Renamed environment
 * variables and flags keep working as deprecated aliases, each reported once per load.
 *
 * Values holding or naming master key material never pass through here as values; the server and
 * the library check those variables for presence only.
 */
import { readFileSync } from 'node:fs';
import { isMap, isScalar, LineCounter, parseDocument } from 'yaml';
import { CodedError, kmsError } from '../errors.js';

/** Where a setting's value came from. */
export type Origin = 'default' | `file ${string}` | `env ${string}` | `flag --${string}`;

export interface FieldSpec {
  /** Environment variables: the first is the name to use, the others deprecated aliases of it. */
  env?: readonly string[];
  /** Flags (without `--`): the first is the name to use, the others deprecated aliases of it. */
  flags?: readonly string[];
  /** Dotted path of the setting in the config file; the field's key when omitted, none when null. */
  file?: string | null;
  /** Turns an environment string into the value; throws CONFIG_INVALID when it cannot. */
  fromEnv?: (text: string, name: string) => unknown;
}

export type FieldTable = Record<string, FieldSpec>;

export interface LayerSources {
  /** The parsed config file and its path, when there is one. */
  file?: { path: string; values: Record<string, unknown> } | undefined;
  env: NodeJS.ProcessEnv;
  /** Flag name (kebab-case, without `--`) → value; undefined means not given. */
  flags?: Record<string, unknown>;
}

export interface Layered {
  /** Only the settings given somewhere; defaults are the schema's business. */
  values: Record<string, unknown>;
  /** Every field of the table, 'default' for those not given. */
  origin: Record<string, Origin>;
  /** One line per deprecated name in use, naming the one to use instead. */
  deprecations: string[];
  /** Environment values that `fromEnv` refused. */
  problems: string[];
}

export function envValue(env: NodeJS.ProcessEnv, name: string): string | undefined {
  const v = env[name];
  return v === undefined || v === '' ? undefined : v;
}

/** Resolves every field of `fields` from the sources; the schema validates the values after. */
export function layer(fields: FieldTable, sources: LayerSources): Layered {
  const out: Layered = { values: {}, origin: {}, deprecations: [], problems: [] };
  for (const [key, spec] of Object.entries(fields)) {
    out.origin[key] = 'default';
    const filePath = spec.file === undefined ? key : spec.file;
    if (sources.file && filePath !== null) {
      const v = valueAt(sources.file.values, filePath);
      if (v !== undefined) set(out, key, v, `file ${sources.file.path}`);
    }
    const fromEnv = pickName(spec.env ?? [], (n) => envValue(sources.env, n), 'environment variable', out);
    if (fromEnv) {
      const parsed = parseEnv(spec, fromEnv.value, fromEnv.name, out.problems);
      if (parsed !== undefined) set(out, key, parsed, `env ${fromEnv.name}`);
    }
    const fromFlag = pickName(spec.flags ?? [], (n) => sources.flags?.[n], 'flag', out, '--');
    if (fromFlag) set(out, key, fromFlag.value, `flag --${fromFlag.name}`);
  }
  return out;
}

function set(out: Layered, key: string, value: unknown, origin: Origin): void {
  out.values[key] = value;
  out.origin[key] = origin;
}

function parseEnv(spec: FieldSpec, text: string, name: string, problems: string[]): unknown {
  if (!spec.fromEnv) return text;
  try {
    return spec.fromEnv(text, name);
  } catch (err) {
    if (!(err instanceof CodedError) || err.code !== 'CONFIG_INVALID') throw err;
    problems.push(err.message);
    return undefined;
  }
}

/** The first name given wins over its aliases; each alias in use is reported as deprecated. */
function pickName<T>(
  names: readonly string[],
  read: (name: string) => T | undefined,
  what: string,
  out: Layered,
  prefix = '',
): { name: string; value: T } | undefined {
  let picked: { name: string; value: T } | undefined;
  names.forEach((name, i) => {
    const value = read(name);
    if (value === undefined) return;
    if (i > 0) {
      out.deprecations.push(
        `${what} ${prefix}${name} is deprecated: use ${prefix}${names[0]}` +
          (picked ? ` (ignored, ${prefix}${picked.name} is set)` : ''),
      );
    }
    picked ??= { name, value };
  });
  return picked;
}

function valueAt(values: Record<string, unknown>, dotted: string): unknown {
  let v: unknown = values;
  for (const part of dotted.split('.')) {
    if (v === null || typeof v !== 'object' || !Object.hasOwn(v, part)) return undefined;
    v = (v as Record<string, unknown>)[part];
  }
  return v;
}

export const TRUE_WORDS: ReadonlySet<string> = new Set(['true', '1', 'yes', 'on']);
export const FALSE_WORDS: ReadonlySet<string> = new Set(['false', '0', 'no', 'off']);

/** `true|1|yes|on` or `false|0|no|off`, any case; unset or empty is undefined. */
export function envBool(name: string, env: NodeJS.ProcessEnv = process.env): boolean | undefined {
  const raw = envValue(env, name);
  return raw === undefined ? undefined : parseBool(raw, name);
}

export function parseBool(raw: string, name: string): boolean {
  const v = raw.trim().toLowerCase();
  if (TRUE_WORDS.has(v)) return true;
  if (FALSE_WORDS.has(v)) return false;
  throw kmsError('CONFIG_INVALID', `${name} must be true or false, got "${raw}"`);
}

/** An integer environment variable; unset or empty is undefined. */
export function envInt(name: string, env: NodeJS.ProcessEnv = process.env): number | undefined {
  const raw = envValue(env, name);
  return raw === undefined ? undefined : parseInteger(raw, name);
}

export function parseInteger(raw: string, name: string): number {
  const n = raw.trim() === '' ? Number.NaN : Number(raw);
  if (!Number.isInteger(n)) throw kmsError('CONFIG_INVALID', `${name} must be an integer, got "${raw}"`);
  return n;
}

/**
 * Reads a YAML or JSON config file that must hold a mapping (YAML is a superset of JSON, so one
 * parser reads both); shared by the server and the KMS daemon. A file that cannot be read or parsed
 * is CONFIG_INVALID at once, with every syntax error as its own problem naming line:column.
 */
/**
 * Where a config file's `master_key` value lies, in bytes: the worker reads exactly those bytes
 * itself, so no code on the main thread keeps the key (the file passes through the YAML parser
 * once, at start, like any config file; `master_key_file` avoids even that).
 */
export interface KeyLocation {
  offset: number;
  length: number;
}

export interface ConfigFileContents {
  /** The settings, without `master_key`. */
  values: Record<string, unknown>;
  /** Where `master_key` is, when the file has one. */
  masterKey: KeyLocation | null;
}

export function readConfigFile(file: string): ConfigFileContents {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw configError([`cannot read config file ${file}: ${(err as NodeJS.ErrnoException).code}`]);
  }
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false });
  if (doc.errors.length > 0) {
    throw configError(
      doc.errors.map((e) => {
        const at = lines.linePos(e.pos[0]);
        return `config file ${file} is not valid YAML or JSON: line ${at.line}:${at.col}: ${e.message}`;
      }),
    );
  }
  const masterKey = isMap(doc.contents) ? locateMasterKey(file, text, doc.get('master_key', true)) : null;
  if (masterKey !== null) doc.delete('master_key');
  const parsed: unknown = doc.toJS();
  if (parsed === null || parsed === undefined) return { values: {}, masterKey };
  if (typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw configError([`config file ${file} must hold a mapping of settings`]);
  }
  return { values: parsed as Record<string, unknown>, masterKey };
}

/** The byte range of `master_key`'s value as written (a one-line scalar, quotes included). */
function locateMasterKey(file: string, text: string, node: unknown): KeyLocation | null {
  if (node === undefined) return null;
  const range = isScalar(node) ? node.range : null;
  const block = isScalar(node) && (node.type === 'BLOCK_LITERAL' || node.type === 'BLOCK_FOLDED');
  if (!range || block) {
    throw configError([`config file ${file}: master_key must be 64 hex characters on its line`]);
  }
  const [start, end] = range;
  return {
    offset: Buffer.byteLength(text.slice(0, start)),
    length: Buffer.byteLength(text.slice(start, end)),
  };
}

/**
 * One CONFIG_INVALID for every problem found (the server's and the daemon's): a single problem on one
 * line, several one per line; `details.problems` holds them as an array.
 */
export function configError(problems: string[]) {
  const list = problems.length === 1 ? ` ${problems[0]}` : `\n  - ${problems.join('\n  - ')}`;
  return kmsError('CONFIG_INVALID', `invalid configuration:${list}`, { problems });
}
