/**
 * The progress line of the long offline commands: counts, rate and time left; redrawn in place on
 * a terminal, a plain line every few seconds (and at the end) otherwise.
 */
import test from 'ava';
import { Progress } from '../src/cli/kms-commands/progress.js';

function fixture(tty: boolean) {
  let now = 1_000_000;
  const out: string[] = [];
  const progress = new Progress({ unit: 'keys', tty, write: (s) => out.push(s), now: () => now });
  return { progress, out, advance: (ms: number) => (now += ms) };
}

test('the line says how many, how fast and how long is left; at the end, how long it took', (t) => {
  const { progress, advance } = fixture(false);
  advance(5000);
  t.is(progress.line(500, 1000), '500/1000 keys (50.0%), 100/s, 5s left');
  advance(120_000);
  t.is(progress.line(1000, 1000), '1000/1000 keys (100.0%), 8/s, in 2m05s');
  t.is(fixture(false).progress.line(0, 0), '0/0 keys (100.0%), 0/s, in 0s');
});

test('not on a terminal: a line every 5 seconds and one at the end, no control characters', (t) => {
  const { progress, out, advance } = fixture(false);
  progress.update(10, 100);
  advance(1000);
  progress.update(20, 100);
  advance(4000);
  progress.update(50, 100);
  progress.update(100, 100);
  progress.end();
  t.is(out.length, 3, out.join(''));
  t.true(out.every((l) => l.endsWith('\n') && !l.includes('\r') && !l.includes('\u001b')));
  t.regex(out[2] ?? '', /^100\/100 keys \(100\.0%\)/);
});

test('on a terminal: one line redrawn in place with a bar, ended by end()', (t) => {
  const { progress, out, advance } = fixture(true);
  advance(1000);
  progress.update(15, 30);
  progress.update(30, 30);
  progress.end();
  t.is(out.length, 3);
  t.regex(out[0] ?? '', /^\r\[#{15}\.{15}\] 15\/30 keys \(50\.0%\)/);
  t.regex(out[1] ?? '', /^\r\[#{30}\] 30\/30 keys/);
  t.is(out[2], '\n');
});
