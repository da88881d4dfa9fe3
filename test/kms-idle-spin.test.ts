import { setImmediate as nextTurn } from 'node:timers/promises';
import { threadId } from 'node:worker_threads';
import test from 'ava';
import { IDLE_SPIN_SIGNAL_BYTES, IDLE_SPIN_WORKER_SLOTS, IdleSpinSlot } from '../src/worker-abi/index.js';
import { IdleSpin } from '../workers/idle-spin.js';

// IdleSpin runs here on the test's own thread: the signal buffer plays the main thread's part.
function setUp(cores = 2) {
  const buffer = new SharedArrayBuffer(IDLE_SPIN_SIGNAL_BYTES);
  const signal = new Int32Array(buffer);
  const postedSlot = IdleSpinSlot.posted + (threadId % IDLE_SPIN_WORKER_SLOTS);
  // A fake clock, so no assertion depends on how fast this machine is: every reading advances it
  // by 0.5 ms (a missed spin of the 2 ms budget takes a few readings), and `clock.ms += n` models a
  // quiet gap between tasks.
  const clock = { ms: 0 };
  const spin = new IdleSpin({ signal: buffer, budgetUs: 2000, cores }, () => (clock.ms += 0.5));
  /** One task posted to and run by this "worker", as the balancer and handler would do it. */
  const runTask = () => {
    Atomics.add(signal, postedSlot, 1);
    spin.taskStarted();
    spin.taskEnded();
  };
  return { signal, postedSlot, spin, runTask, clock };
}

test('an idle worker spins after a task and stops as soon as a task is posted to it', async (t) => {
  const { signal, postedSlot, spin, runTask } = setUp();
  runTask();
  // The next post lands before the spin starts: the spin must see it at once and count it found.
  Atomics.add(signal, postedSlot, 1);
  await nextTurn();
  t.deepEqual(spin.stats, { spins: 1, found: 1 });
  t.is(Atomics.load(signal, IdleSpinSlot.spinner), 0, 'the spinner slot is released');
  t.is(Atomics.load(signal, IdleSpinSlot.busy), 0);
});

test('spinning stops while tasks come slower than the budget and resumes when they come quickly', async (t) => {
  const { spin, runTask, clock } = setUp();
  runTask();
  await nextTurn();
  t.deepEqual(spin.stats, { spins: 1, found: 0 }, 'no history yet: the first idle spins');
  const quiet = async (tasks: number) => {
    for (let i = 0; i < tasks; i++) {
      clock.ms += 10; // a quiet gap, five times the 2 ms budget
      runTask();
      await nextTurn();
    }
  };
  await quiet(3);
  const afterWarmUp = spin.stats.spins;
  await quiet(5);
  t.is(spin.stats.spins, afterWarmUp, 'gaps longer than the budget: no spinning');
  // Back-to-back tasks pull the average gap under the budget again.
  for (let i = 0; i < 3; i++) {
    runTask();
    await nextTurn();
  }
  t.true(spin.stats.spins > 1, 'tasks within the budget turn spinning back on');
});

test('no spin while another worker is busy on two cores, or when a task is already waiting', async (t) => {
  const { signal, postedSlot, spin, runTask } = setUp(2);
  Atomics.add(signal, IdleSpinSlot.busy, 1);
  runTask();
  await nextTurn();
  t.is(spin.stats.spins, 0, 'a busy peer plus the main thread already fill two cores');
  Atomics.sub(signal, IdleSpinSlot.busy, 1);

  Atomics.add(signal, postedSlot, 2);
  spin.taskStarted();
  spin.taskEnded();
  await nextTurn();
  t.is(spin.stats.spins, 0, 'the waiting task runs next; nothing to spin for');
});

test('on one core a worker never spins (it would only take the main thread’s core)', async (t) => {
  const { spin, runTask } = setUp(1);
  runTask();
  await nextTurn();
  t.is(spin.stats.spins, 0);
});

test('only one worker spins at a time', async (t) => {
  const { signal, spin, runTask } = setUp(4);
  Atomics.store(signal, IdleSpinSlot.spinner, threadId + 1);
  runTask();
  await nextTurn();
  t.is(spin.stats.spins, 0);
  t.is(Atomics.load(signal, IdleSpinSlot.spinner), threadId + 1, 'the other spinner keeps its slot');
});
