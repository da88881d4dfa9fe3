/**
 * What both programs answer before doing anything: --version, and a mistyped sub-command of
 * progressdb-kms refused with a suggestion instead of being taken for `serve`.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { ROOT } from './helpers/kms.js';
import { KMS_CLI, runCli, SERVER_CLI, tempDir } from './helpers/server.js';

const VERSION = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string })
  .version;

test('--version and -V print the package version on both programs and exit 0', async (t) => {
  const runs = await Promise.all([
    runCli(KMS_CLI, ['--version']),
    runCli(KMS_CLI, ['-V']),
    runCli(SERVER_CLI, ['--version']),
  ]);
  for (const res of runs) {
    t.is(res.code, 0, res.stderr);
    t.is(res.stdout, `${VERSION}\n`);
  }
});

test('a mistyped progressdb-kms command is one line with a suggestion and exit 1; nothing starts', async (t) => {
  const cases: [string[], RegExp][] = [
    [['sevre'], /^progressdb-kms: unknown command "sevre" \(did you mean "serve"\?\)\n$/],
    [['rotat'], /^progressdb-kms: unknown command "rotat" \(did you mean "rotate"\?\)\n$/],
    [['aduit'], /^progressdb-kms: unknown command "aduit" \(did you mean "audit"\?\)\n$/],
    [['bogus'], /^progressdb-kms: unknown command "bogus" \(commands: serve, keygen, audit, .*\)\n$/],
    // A sub-command's own sub-commands are checked the same way, in the same words.
    [
      ['audit', 'verifyy'],
      /^progressdb-kms: unknown command "audit verifyy" \(did you mean "audit verify"\?\)\n$/,
    ],
    [['audit', 'bogus'], /^progressdb-kms: unknown command "audit bogus" \(commands: verify, help\)\n$/],
  ];
  const runs = await Promise.all(
    cases.map(([words]) => runCli(KMS_CLI, [...words, '--listen', '127.0.0.1:0'])),
  );
  for (const [i, res] of runs.entries()) {
    const [words, expected] = cases[i] as [string[], RegExp];
    const word = words.join(' ');
    t.is(res.code, 1, word);
    t.regex(res.stderr, expected);
    t.is(res.stdout, '', `${word}: nothing started`);
  }
});

test('options alone still run serve (the default command); they fail here only on the missing key', async (t) => {
  const res = await runCli(KMS_CLI, [
    '--listen',
    '127.0.0.1:0',
    '--data-dir',
    path.join(tempDir('pdb-cli-'), 'kms'),
  ]);
  t.is(res.code, 1);
  t.regex(res.stderr, /^progressdb-kms: MASTER_KEY_MISSING/);
});
