/**
 * The deletion window (deletionWindow): destroyDek disables a key at once (every use refused with
 * KEY_PENDING_DELETION, audited), cancelDeletion restores it within the window, and the sweep
 * destroys it once the window has ended, also when that happened while the KMS was down. Time is
 * an injected clock; the daemon test checks the HTTP and bridge mapping of the same.
 */
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { loadDaemonConfig } from '../src/config/daemon.js';
import { resolveKmsOptions } from '../src/config/library.js';
import { createRemoteKms } from '../src/remote/index.js';
import { type AuditLine, auditLines, expectCode, manualClock, openKms, tempDir } from './helpers/kms.js';
import { b64, postJson, spawnDaemon } from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';
import { KMS_CLI, runCli } from './helpers/server.js';

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

/** An audit line as [op, outcome or code, caller, detail], its ISO times made `T`. */
const summary = (l: AuditLine) => [l.op, l.code ?? l.outcome, l.caller, l.detail?.replace(/\d{4}-\S+/, 'T')];

test('library: destroy disables the key at once, cancel restores it, and the end of the window destroys it', async (t) => {
  const clock = manualClock();
  const { kms, dataDir } = await openKms(t, { deletionWindow: '7d', clock });
  const dek = await kms.createDekForThread('windowed');
  const sealed = await kms.encrypt(dek.keyId, Buffer.from('kept through the window'));
  const destroyed = await kms.destroyDek(dek.keyId);
  const dueAt = new Date(clock.now() + 7 * DAY).toISOString();
  t.deepEqual(destroyed, { keyId: dek.keyId, destroyedVersions: [], deletionDueAt: dueAt });
  const uses = [
    kms.encrypt(dek.keyId, Buffer.from('x')),
    kms.decrypt(dek.keyId, sealed.ciphertext),
    kms.reencrypt(dek.keyId, sealed.ciphertext),
    kms.getWrappedDek(dek.keyId),
    kms.rewrapDek(dek.keyId),
    kms.rotateDek(dek.keyId),
    kms.destroyDekVersionsBefore(dek.keyId, 1),
    kms.createDekForThread('windowed'),
  ];
  for (const use of uses) await expectCode(t, use, 'KEY_PENDING_DELETION');
  const [item] = await kms.decryptBatch([{ keyId: dek.keyId, ciphertext: sealed.ciphertext }]);
  t.is(item?.ok === false && item.error.code, 'KEY_PENDING_DELETION');
  t.deepEqual(await kms.destroyDek(dek.keyId), destroyed, 'a second destroy keeps the due time');

  clock.advance(6 * DAY);
  t.like(await kms.cancelDeletion(dek.keyId), { keyId: dek.keyId, threadId: 'windowed', keyVersion: 1 });
  t.is((await kms.decrypt(dek.keyId, sealed.ciphertext)).toString(), 'kept through the window');
  await expectCode(t, kms.cancelDeletion(dek.keyId), 'KEY_NOT_PENDING_DELETION');

  await kms.destroyDek(dek.keyId);
  clock.advance(7 * DAY);
  // The thread index goes with the key: the count of keys falls to 0 once it is destroyed.
  await until('the sweep', async () => ((await kms.health()).dekCount === 0 ? true : undefined), 10_000);
  const late = await expectCode(t, kms.cancelDeletion(dek.keyId), 'KEY_NOT_FOUND');
  t.regex(late?.message ?? '', /was destroyed at/);
  await expectCode(t, kms.decrypt(dek.keyId, sealed.ciphertext), 'KEY_NOT_FOUND');
  t.not((await kms.createDekForThread('windowed')).keyId, dek.keyId, 'the thread gets a new key');

  const lines = auditLines(dataDir).filter((l) => l.key_id === dek.keyId);
  t.deepEqual(lines.filter((l) => l.op === 'destroy_dek' || l.op === 'cancel_deletion').map(summary), [
    ['destroy_dek', 'ok', 'embedded', 'deletion scheduled: destroyed at T'],
    ['destroy_dek', 'ok', 'embedded', 'already pending deletion: destroyed at T'],
    ['cancel_deletion', 'ok', 'embedded', 'key version 1 usable again'],
    ['cancel_deletion', 'KEY_NOT_PENDING_DELETION', 'embedded', undefined],
    ['destroy_dek', 'ok', 'embedded', 'deletion scheduled: destroyed at T'],
    ['destroy_dek', 'ok', 'kms-deletion-window', 'destroyed [1]'],
    ['cancel_deletion', 'KEY_NOT_FOUND', 'embedded', undefined],
  ]);
  const refused = lines.filter((l) => l.code === 'KEY_PENDING_DELETION').map((l) => l.op);
  t.deepEqual(
    [...new Set(refused)].sort(),
    [
      'create_dek_for_thread',
      'decrypt',
      'destroy_dek_versions',
      'encrypt',
      'get_wrapped',
      'reencrypt',
      'rewrap',
      'rotate_dek',
    ],
    'every refused use is audited',
  );
});

test('the window survives restarts, and a KMS started after it ended destroys the key at start', async (t) => {
  const clock = manualClock();
  const fx = await openKms(t, { deletionWindow: '1h', clock });
  const dek = await fx.kms.createDekForThread('restarted');
  await fx.kms.destroyDek(dek.keyId);
  await fx.kms.close();

  // deletionWindow 0 destroys at once, as before the window existed; what is pending stays so.
  const atOnce = await fx.reopen({ deletionWindow: 0 });
  await expectCode(t, atOnce.getWrappedDek(dek.keyId), 'KEY_PENDING_DELETION');
  const other = await atOnce.createDekForThread('destroyed-at-once');
  t.deepEqual(await atOnce.destroyDek(other.keyId), {
    keyId: other.keyId,
    destroyedVersions: [1],
    deletionDueAt: null,
  });
  await expectCode(t, atOnce.getWrappedDek(other.keyId), 'KEY_NOT_FOUND');
  await atOnce.close();

  clock.advance(2 * HOUR);
  // Checks an hour apart: only the sweep at start can destroy the key within the test.
  const late = await fx.reopen({ clock: { ...clock, checkEveryMs: HOUR } });
  await until(
    'the start-up sweep',
    async () => ((await late.health()).dekCount === 0 ? true : undefined),
    10_000,
  );
  await expectCode(t, late.cancelDeletion(dek.keyId), 'KEY_NOT_FOUND');
  const destruction = auditLines(fx.dataDir).filter((l) => l.caller === 'kms-deletion-window');
  t.deepEqual(destruction.map(summary), [['destroy_dek', 'ok', 'kms-deletion-window', 'destroyed [1]']]);
  t.is(destruction[0]?.key_id, dek.keyId);
});

test('progressdb-kms cancel-deletion restores a key offline; a key not pending is refused', async (t) => {
  const fx = await openKms(t, { deletionWindow: '7d' });
  const dek = await fx.kms.createDekForThread('offline');
  const sealed = await fx.kms.encrypt(dek.keyId, Buffer.from('restored offline'));
  await fx.kms.destroyDek(dek.keyId);
  await fx.kms.close();
  const args = [
    'cancel-deletion',
    '--key-id',
    dek.keyId,
    '--data-dir',
    fx.dataDir,
    '--master-key-file',
    fx.keyFile,
  ];
  const ok = await runCli(KMS_CLI, args);
  t.is(ok.code, 0, ok.stderr);
  t.regex(ok.stdout, new RegExp(`deletion of key ${dek.keyId} \\(thread offline\\) cancelled`));
  const again = await runCli(KMS_CLI, args);
  t.is(again.code, 1);
  t.regex(again.stderr, /KEY_NOT_PENDING_DELETION: key dek_\w+ is not pending deletion/);
  const kms = await fx.reopen();
  t.is((await kms.decrypt(dek.keyId, sealed.ciphertext)).toString(), 'restored offline');
  t.true(
    auditLines(fx.dataDir).some(
      (l) => l.op === 'cancel_deletion' && l.caller === 'progressdb-kms cancel-deletion',
    ),
  );
});

test('the window is 7 days unless configured; 0 and durations are accepted, anything else is CONFIG_INVALID', (t) => {
  const base = { dataDir: '/tmp/unused', masterKeyFile: '/tmp/unused.key' };
  t.is(resolveKmsOptions(base).deletionWindowMs, 7 * DAY);
  t.is(resolveKmsOptions({ ...base, deletionWindow: '0' }).deletionWindowMs, 0);
  t.is(resolveKmsOptions({ ...base, deletionWindow: 0 }).deletionWindowMs, 0);
  t.is(resolveKmsOptions({ ...base, deletionWindow: '12h' }).deletionWindowMs, 12 * HOUR);
  for (const bad of ['soon', '-1d', -1, 1.5]) {
    t.throws(() => resolveKmsOptions({ ...base, deletionWindow: bad }), {
      code: 'CONFIG_INVALID',
      message: /deletionWindow/,
    });
  }
  const file = path.join(tempDir(t), 'kms.yaml');
  writeFileSync(file, 'data_dir: kms\nkms:\n  deletion_window: 30d\n');
  t.is(loadDaemonConfig({ config: file }).kms.deletionWindow, '30d');
});

test('daemon: 409 KEY_PENDING_DELETION over HTTP and the bridge, deletion_due_at, POST /cancel_deletion', async (t) => {
  const daemon = await spawnDaemon({ bridgePort: 0, env: { PROGRESSDB_KMS_DELETION_WINDOW: '1h' } });
  t.teardown(() => daemon.stop());
  const base = `http://${daemon.http}`;
  const { key_id: keyId } = (await postJson(base, '/create_dek_for_thread', { thread_id: 'over-http' })).json;
  const sealed = (await postJson(base, '/encrypt', { key_id: keyId, plaintext: b64('over the wire') })).json;
  const before = Date.now();
  const destroyed = await postJson(base, '/destroy_dek', { key_id: keyId });
  t.is(destroyed.status, 200, destroyed.text);
  const due = Date.parse(destroyed.json.deletion_due_at);
  t.true(due >= before + HOUR - 60_000 && due <= Date.now() + HOUR, destroyed.text);
  const refused = await postJson(base, '/decrypt', { key_id: keyId, ciphertext: sealed.ciphertext });
  t.is(refused.status, 409);
  t.is(refused.json.error.code, 'KEY_PENDING_DELETION');

  const bridge = createRemoteKms({ endpoint: `tcp://${daemon.bridge}` });
  t.teardown(() => bridge.close());
  const again = await bridge.destroyDek(keyId);
  t.is(again.deletionDueAt, destroyed.json.deletion_due_at, 'the bridge carries the due time');
  await expectCode(t, bridge.encrypt(keyId, Buffer.from('x')), 'KEY_PENDING_DELETION');

  const cancelled = await postJson(base, '/cancel_deletion', { key_id: keyId });
  t.is(cancelled.status, 200, cancelled.text);
  t.like(cancelled.json, { key_id: keyId, thread_id: 'over-http' });
  const opened = await bridge.decrypt(keyId, Buffer.from(sealed.ciphertext, 'base64'));
  t.is(opened.toString(), 'over the wire');
  await expectCode(t, bridge.cancelDeletion(keyId), 'KEY_NOT_PENDING_DELETION');
  const notPending = await postJson(base, '/cancel_deletion', { key_id: keyId });
  t.is(notPending.status, 409);
  t.is(notPending.json.error.code, 'KEY_NOT_PENDING_DELETION');
  const unknown = await postJson(base, '/cancel_deletion', { key_id: 'dek_unknown' });
  t.is(unknown.status, 404);
  t.is(unknown.json.error.code, 'KEY_NOT_FOUND');
});

test('new keys and key versions are stamped by the KMS clock', async (t) => {
  const clock = manualClock(Date.parse('2031-05-06T07:08:09.000Z'));
  const { kms } = await openKms(t, { clock });
  const created = await kms.createDekForThread('thread-stamped');
  t.is(created.createdAt, '2031-05-06T07:08:09.000Z');
  clock.advance(60_000);
  const rotated = await kms.rotateDek(created.keyId);
  t.is(rotated.keyVersion, 2);
  t.is(rotated.createdAt, '2031-05-06T07:08:09.000Z', 'the key keeps its creation time');
});
