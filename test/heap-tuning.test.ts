import test from 'ava';
import { HEAP_GROWING_PERCENT, heapTuningFlag } from '../src/cli/heap-tuning.js';

test('the daemon and server raise the heap growing factor by default', (t) => {
  t.is(heapTuningFlag([]), `--heap-growing-percent=${HEAP_GROWING_PERCENT}`);
  t.is(
    heapTuningFlag(['--enable-source-maps', '--max-old-space-size=512']),
    `--heap-growing-percent=${HEAP_GROWING_PERCENT}`,
  );
});

test("an operator's own growing factor on the node command line wins, in either spelling", (t) => {
  t.is(heapTuningFlag(['--heap-growing-percent=150']), null);
  t.is(heapTuningFlag(['--heap_growing_percent=150']), null);
});
