/**
 * The size limits the code keeps (issue 10): no source file over 500 lines and no function over
 * 80 lines in src/ and workers/. Big files and long functions are where a newcomer loses the
 * thread; a test keeps the limits from eroding one exception at a time. Split by meaning when
 * this fails, not by cutting.
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import ts from 'typescript';

const ROOTS = ['src', 'workers'];
const MAX_FILE_LINES = 500;
const MAX_FUNCTION_LINES = 80;

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(p);
    return p.endsWith('.ts') ? [p] : [];
  });
}

interface Oversize {
  where: string;
  lines: number;
}

function longFunctions(file: string, text: string): Oversize[] {
  const source = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true);
  const found: Oversize[] = [];
  const visit = (node: ts.Node): void => {
    if (ts.isFunctionLike(node) && 'body' in node && node.body !== undefined) {
      const first = source.getLineAndCharacterOfPosition(node.getStart(source)).line;
      const last = source.getLineAndCharacterOfPosition(node.end).line;
      const lines = last - first + 1;
      if (lines > MAX_FUNCTION_LINES) found.push({ where: `${file}:${first + 1}`, lines });
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return found;
}

const files = ROOTS.flatMap(sourceFiles);

test('the scan sees the source tree', (t) => {
  t.true(files.includes(path.join('src', 'index.ts')));
  t.true(files.includes(path.join('workers', 'crypto.ts')));
});

test(`no source file in ${ROOTS.join(', ')} is over ${MAX_FILE_LINES} lines`, (t) => {
  const big = files
    .map((file) => ({ where: file, lines: fs.readFileSync(file, 'utf8').split('\n').length }))
    .filter((f) => f.lines > MAX_FILE_LINES);
  t.deepEqual(big, []);
});

test(`no function in ${ROOTS.join(', ')} is over ${MAX_FUNCTION_LINES} lines`, (t) => {
  const long = files.flatMap((file) => longFunctions(file, fs.readFileSync(file, 'utf8')));
  t.deepEqual(long, []);
});

test('the function scan finds a long function', (t) => {
  const body = Array.from({ length: MAX_FUNCTION_LINES }, (_, i) => `  const v${i} = ${i};`).join('\n');
  t.is(longFunctions('x.ts', `function long() {\n${body}\n}\n`).length, 1);
  t.is(longFunctions('x.ts', 'const short = () => {\n  return 1;\n};\n').length, 0);
});
