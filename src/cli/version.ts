/** The package's version, read from package.json beside src/ or dist/ (found by walking up). */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export function packageVersion(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const file = path.join(dir, 'package.json');
    if (existsSync(file)) return (JSON.parse(readFileSync(file, 'utf8')) as { version: string }).version;
    const parent = path.dirname(dir);
    if (parent === dir) return 'unknown';
    dir = parent;
  }
}

/** Edit distance of two short words (command names), for "did you mean". */
function distance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const substitution = (previous[j - 1] as number) + (a[i - 1] === b[j - 1] ? 0 : 1);
      current.push(Math.min((previous[j] as number) + 1, (current[j - 1] as number) + 1, substitution));
    }
    previous = current;
  }
  return previous[b.length] as number;
}

/** What a refusal needs of a command: its name and its sub-commands (commander's Command fits). */
export interface CommandNode {
  name(): string;
  readonly commands: readonly CommandNode[];
}

/**
 * The one-line refusal of a word that names no sub-command of `parents` (the command words before
 * it, none at the top level), or null when it names one (or is an option, which the default
 * command or the parent's help takes).
 */
function unknownCommand(
  program: string,
  given: string | undefined,
  commands: string[],
  parents: readonly string[] = [],
): string | null {
  if (given === undefined || given.startsWith('-') || commands.includes(given)) return null;
  const [best] = commands
    .map((name) => ({ name, d: distance(given, name) }))
    .filter((c) => c.d <= Math.max(1, Math.ceil(c.name.length / 3)))
    .sort((x, y) => x.d - y.d);
  const named = (word: string) => [...parents, word].join(' ');
  const hint = best ? ` (did you mean "${named(best.name)}"?)` : ` (commands: ${commands.join(', ')})`;
  return `${program}: unknown command "${named(given)}"${hint}`;
}

/**
 * The refusal of the first command word, at any depth (`audit verifyy`), that names none of its
 * parent's sub-commands, or null. `args` are the words after the program's name.
 */
export function unknownCommandIn(program: string, args: readonly string[], root: CommandNode): string | null {
  let node = root;
  const parents: string[] = [];
  for (const word of args) {
    if (node.commands.length === 0) return null;
    const names = [...node.commands.map((c) => c.name()), 'help'];
    const refusal = unknownCommand(program, word, names, parents);
    if (refusal !== null) return refusal;
    const next = node.commands.find((c) => c.name() === word);
    if (next === undefined) return null;
    parents.push(word);
    node = next;
  }
  return null;
}
