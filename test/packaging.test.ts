/**
 * What `npm pack` ships: the built program and nothing of the development tree (no tests, test
 * helpers or benchmarks), both executables, and source maps that resolve (each carries its source,
 * since src/ is not shipped). The dry run skips prepack's build; dist/ is the one `npm test` built.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import test from 'ava';
import { ROOT } from './helpers/kms.js';

interface PackageJson {
  main: string;
  types: string;
  bin: Record<string, string>;
  scripts: Record<string, string>;
}

const pkg = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as PackageJson;

async function packedFiles(): Promise<string[]> {
  const { stdout } = await promisify(execFile)('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], {
    cwd: ROOT,
  });
  const [report] = JSON.parse(stdout) as [{ files: { path: string }[] }];
  return report.files.map((f) => f.path);
}

/** `./dist/x.js` → `dist/x.js`, as npm lists it. */
const listed = (target: string) => path.posix.normalize(target);

test('npm pack ships the built program only: both executables, no tests, helpers or benchmarks', async (t) => {
  const files = await packedFiles();
  const shipped = new Set(files);
  for (const [name, target] of Object.entries(pkg.bin)) t.true(shipped.has(listed(target)), `bin ${name}`);
  t.true(shipped.has(listed(pkg.main)));
  t.true(shipped.has(listed(pkg.types)));
  t.true(shipped.has('dist/workers/crypto.js'), 'the worker the pool loads');
  const outside = files.filter(
    (f) =>
      !f.startsWith('dist/src/') &&
      !f.startsWith('dist/workers/') &&
      f !== 'package.json' &&
      f !== 'README.md' &&
      f !== 'LICENSE',
  );
  t.deepEqual(outside, []);
  t.true(shipped.has('LICENSE'), 'the licence package.json names');
  t.deepEqual(
    files.filter((f) => /(^|\/)(test|bench|helpers|\.ci)\//.test(f) || /\.test\.[jt]s/.test(f)),
    [],
  );
  t.deepEqual(
    files.filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts')),
    [],
    'TypeScript sources are not shipped',
  );

  // A map whose source is neither shipped nor inside it would send a debugger to a missing file.
  const maps = files.filter((f) => f.endsWith('.map'));
  t.true(maps.length > 0);
  const unresolved = maps.filter((f) => {
    const map = JSON.parse(readFileSync(path.join(ROOT, f), 'utf8')) as {
      sources: string[];
      sourcesContent?: (string | null)[];
    };
    return map.sources.some(
      (source, i) =>
        typeof map.sourcesContent?.[i] !== 'string' &&
        !shipped.has(path.posix.join(path.posix.dirname(f), source)),
    );
  });
  t.deepEqual(unresolved, []);
});

test('npm pack builds first, from a clean dist/, so a fresh clone packs what its sources say', (t) => {
  const prepack = pkg.scripts.prepack ?? '';
  t.regex(prepack, /rmSync\('dist'/);
  t.regex(prepack, /npm run build$/);
});
