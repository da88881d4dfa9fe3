/**
 * Scheduled KEK rotation (kekRotationPeriod): the KMS rotates by itself once the active KEK
 * version is older than the period, reports the next due time in health and metrics, and a
 * schedule never starts a second rotation for the same version. Time is an injected clock.
 */
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { loadDaemonConfig } from '../src/config/daemon.js';
import { parseDuration, RotationSchedule } from '../src/kms/rotation-schedule.js';
import { createLogger } from '../src/log.js';
import { auditLines, manualClock, openKms, tempDir } from './helpers/kms.js';
import { request, spawnDaemon } from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';

const DAY = 86_400_000;

test('durations: 90d, 12h, 30m, 45s, 500ms and 2w; anything else is CONFIG_INVALID naming the setting', (t) => {
  t.is(parseDuration('90d', 'p'), 90 * DAY);
  t.is(parseDuration('12h', 'p'), 12 * 3_600_000);
  t.is(parseDuration('30m', 'p'), 1_800_000);
  t.is(parseDuration('45s', 'p'), 45_000);
  t.is(parseDuration('500ms', 'p'), 500);
  t.is(parseDuration('2w', 'p'), 14 * DAY);
  for (const bad of ['', '90', 'd', '0d', '-1d', '1.5d', '90 days', '1y']) {
    t.throws(() => parseDuration(bad, 'kek_rotation_period'), {
      message: /kek_rotation_period must be a positive duration/,
    });
  }
});

test('the KMS rotates by itself once the active KEK is older than the period, and says when it is next due', async (t) => {
  const clock = manualClock();
  const { kms, dataDir } = await openKms(t, { kekRotationPeriod: '90d', clock });
  const { keyId } = await kms.createDekForThread('scheduled');
  const sealed = await kms.encrypt(keyId, Buffer.from('before the rotation'));

  const first = await kms.health();
  const madeAt = Date.parse(first.nextRotationDueAt ?? '') - 90 * DAY;
  t.true(Math.abs(madeAt - clock.now()) < 60_000, 'due 90 days after the first KEK was made');
  t.is(first.activeKekVersion, 1);

  clock.advance(91 * DAY);
  const rotated = await until(
    'the scheduled rotation',
    async () => {
      const s = await kms.rotationStatus();
      return s.state === 'completed' && s.activeKekVersion === 2 ? s : undefined;
    },
    20_000,
  );
  t.deepEqual(rotated.kekVersions, [2]);
  const after = await kms.health();
  // The new KEK is stamped with the clock's time, so it started only once the clock was past due.
  t.is(after.nextRotationDueAt, new Date(clock.now() + 90 * DAY).toISOString());
  t.is((await kms.decrypt(keyId, sealed.ciphertext)).toString(), 'before the rotation');
  const starts = auditLines(dataDir).filter((l) => l.op === 'rotate_kek' && l.detail?.startsWith('start'));
  t.deepEqual(
    starts.map((l) => [l.caller, l.detail]),
    [['kms-schedule', 'start: KEK version 1 -> 2']],
  );
});

test('a schedule starts one rotation per due version: never while one runs, never again once the version moved', async (t) => {
  const clock = manualClock();
  let active = { version: 1, createdAt: new Date(clock.now() - 10 * DAY).toISOString() };
  const asked: number[] = [];
  let finish: () => void = () => undefined;
  const schedule = new RotationSchedule({
    periodMs: 7 * DAY,
    clock,
    activeKek: () => active,
    rotate: (version) => {
      asked.push(version);
      return new Promise<void>((resolve) => {
        finish = resolve;
      });
    },
    log: createLogger('test', 'silent'),
  });
  schedule.check();
  schedule.check();
  t.deepEqual(asked, [1], 'one start while the first runs');
  active = { version: 2, createdAt: new Date(clock.now()).toISOString() };
  finish();
  await new Promise<void>((resolve) => setImmediate(resolve));
  schedule.check();
  t.deepEqual(asked, [1], 'the new version is not due');
  t.is(schedule.nextDueAt(), new Date(clock.now() + 7 * DAY).toISOString());
  clock.advance(7 * DAY);
  schedule.check();
  t.deepEqual(asked, [1, 2]);
});

test('daemon: kms.kek_rotation_period in the file; /health and /metrics show when the KEK falls due', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'kms.yaml');
  writeFileSync(file, 'data_dir: kms\nkms:\n  kek_rotation_period: 30d\n');
  t.is(loadDaemonConfig({ config: file }).kms.kekRotationPeriod, '30d');

  const daemon = await spawnDaemon({ args: ['--config', file] });
  t.teardown(() => daemon.kill9());
  const base = `http://${daemon.http}`;
  const health = await request(base, '/health');
  t.is(health.status, 200);
  const due = Date.parse(health.json.next_rotation_due_at);
  t.true(Math.abs(due - (Date.now() + 30 * DAY)) < 120_000, health.text);
  const metrics = await request(base, '/metrics');
  const line = metrics.text
    .split('\n')
    .find((l) => l.startsWith('progressdb_kms_kek_rotation_next_due_timestamp_seconds '));
  t.is(Number(line?.split(' ')[1]), due / 1000);

  writeFileSync(file, 'data_dir: kms\nkms:\n  kek_rotation_period: soon\n');
  const bad = await spawnDaemon({ args: ['--config', file] }).then(
    () => 'started',
    (err: Error) => err.message,
  );
  t.regex(bad, /CONFIG_INVALID: kekRotationPeriod must be a positive duration/);
});
