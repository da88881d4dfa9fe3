/**
 * The daemon's HTTP API, end to end: the real `progressdb-kms serve` as a child process with the
 * real embedded KMS behind it. Every endpoint, batches with mixed items, and every error status
 * a request can produce (400, 404, 405, 413, 415, 422).
 */
import test from 'ava';
import { b64, type Daemon, postJson, request, spawnDaemon } from './helpers/kms-daemon.js';
import { until } from './helpers/processes.js';

let daemon: Daemon;
let base: string;

test.before(async () => {
  daemon = await spawnDaemon({ args: ['--max-body-bytes', '65536', '--max-batch-items', '100'] });
  base = `http://${daemon.http}`;
});

test.after.always(async () => {
  await daemon?.kill9();
});

/** Every leaf of a response is a JSON string (numbers included). */
function allStrings(t: { true(v: boolean, m?: string): void }, value: unknown, where = '$'): void {
  if (value !== null && typeof value === 'object') {
    for (const [k, v] of Object.entries(value)) allStrings(t, v, `${where}.${k}`);
  } else {
    t.true(typeof value === 'string', `${where} is a string`);
  }
}

async function newKey(thread: string): Promise<string> {
  const res = await postJson(base, '/create_dek_for_thread', { thread_id: thread });
  if (res.status !== 200) throw new Error(`create failed: ${res.text}`);
  return res.json.key_id as string;
}

test('the daemon logs one line per listener with address, TLS and auth mode', (t) => {
  const [line] = daemon.listeners();
  t.is(line!.listener, 'http');
  t.is(line!.tls, 'off');
  t.is(line!.auth, 'none');
  t.true(line!.port > 0);
});

test('GET /healthz answers ok', async (t) => {
  const res = await request(base, '/healthz');
  t.is(res.status, 200);
  t.is(res.text, 'ok');
});

test('POST /create_dek_for_thread is idempotent per thread and answers strings only', async (t) => {
  const first = await postJson(base, '/create_dek_for_thread', { thread_id: 'thread-create' });
  t.is(first.status, 200);
  allStrings(t, first.json);
  for (const f of ['key_id', 'wrapped', 'kek_id', 'kek_version']) t.truthy(first.json[f], f);
  t.regex(first.json.kek_version, /^\d+$/);
  const again = await postJson(base, '/create_dek_for_thread', { thread_id: 'thread-create' });
  t.is(again.json.key_id, first.json.key_id);
  const other = await postJson(base, '/create_dek_for_thread', { thread_id: 'thread-create-2' });
  t.not(other.json.key_id, first.json.key_id);
});

test('GET /get_wrapped returns the wrapped key; unknown keys are 404', async (t) => {
  const keyId = await newKey('thread-get');
  const res = await request(base, `/get_wrapped?key_id=${encodeURIComponent(keyId)}`);
  t.is(res.status, 200);
  allStrings(t, res.json);
  t.is(res.json.key_id, keyId);
  t.true(Buffer.from(res.json.wrapped, 'base64').length > 32);
  const missing = await request(base, '/get_wrapped?key_id=dek_nope');
  t.is(missing.status, 404);
  t.is(missing.json.error.code, 'KEY_NOT_FOUND');
  const noParam = await request(base, '/get_wrapped');
  t.is(noParam.status, 400);
  t.is(noParam.json.error.code, 'INVALID_INPUT');
});

test('POST /encrypt and /decrypt round-trip with AAD; wrong AAD or tampering is 422', async (t) => {
  const keyId = await newKey('thread-crypt');
  const enc = await postJson(base, '/encrypt', {
    key_id: keyId,
    plaintext: b64('secret body'),
    aad: b64('m1'),
  });
  t.is(enc.status, 200);
  allStrings(t, enc.json);
  t.is(enc.json.key_version, '1');
  const dec = await postJson(base, '/decrypt', {
    key_id: keyId,
    ciphertext: enc.json.ciphertext,
    aad: b64('m1'),
  });
  t.is(dec.status, 200);
  t.is(Buffer.from(dec.json.plaintext, 'base64').toString(), 'secret body');

  const wrongAad = await postJson(base, '/decrypt', {
    key_id: keyId,
    ciphertext: enc.json.ciphertext,
    aad: b64('m2'),
  });
  t.is(wrongAad.status, 422);
  t.is(wrongAad.json.error.code, 'DECRYPT_FAILED');
  const ct = Buffer.from(enc.json.ciphertext, 'base64');
  ct[ct.length - 1]! ^= 1;
  const tampered = await postJson(base, '/decrypt', { key_id: keyId, ciphertext: b64(ct), aad: b64('m1') });
  t.is(tampered.status, 422);
  t.notRegex(tampered.text, /secret|stack|at /);
});

test('empty plaintext is allowed and round-trips', async (t) => {
  const keyId = await newKey('thread-empty');
  const enc = await postJson(base, '/encrypt', { key_id: keyId, plaintext: '' });
  t.is(enc.status, 200);
  const dec = await postJson(base, '/decrypt', { key_id: keyId, ciphertext: enc.json.ciphertext });
  t.is(dec.json.plaintext, '');
});

test('a batch answers every item in order, each with its own result or error', async (t) => {
  const keyId = await newKey('thread-batch');
  const enc = await postJson(base, '/encrypt', {
    batch_input: [
      { key_id: keyId, plaintext: b64('one') },
      { key_id: keyId, plaintext: 'not base64!' },
      { key_id: 'dek_missing', plaintext: b64('x') },
      { plaintext: b64('no key') },
      'not an object',
      { key_id: keyId, plaintext: b64('two'), aad: b64('a') },
    ],
  });
  t.is(enc.status, 200);
  const r = enc.json.batch_results;
  t.is(r.length, 6);
  t.truthy(r[0].ciphertext);
  t.is(r[1].error.code, 'MALFORMED_BASE64');
  t.is(r[2].error.code, 'KEY_NOT_FOUND');
  t.is(r[3].error.code, 'INVALID_INPUT');
  t.is(r[4].error.code, 'INVALID_INPUT');
  t.truthy(r[5].ciphertext);
  allStrings(t, enc.json);

  const dec = await postJson(base, '/decrypt', {
    batch_input: [
      { key_id: keyId, ciphertext: r[5].ciphertext, aad: b64('a') },
      { key_id: keyId, ciphertext: r[5].ciphertext, aad: b64('b') },
      { key_id: keyId, ciphertext: r[0].ciphertext },
    ],
  });
  t.is(dec.status, 200);
  const d = dec.json.batch_results;
  t.is(Buffer.from(d[0].plaintext, 'base64').toString(), 'two');
  t.is(d[1].error.code, 'DECRYPT_FAILED');
  t.is(Buffer.from(d[2].plaintext, 'base64').toString(), 'one');

  const empty = await postJson(base, '/encrypt', { batch_input: [] });
  t.deepEqual(empty.json, { batch_results: [] });
  const notArray = await postJson(base, '/encrypt', { batch_input: 'x' });
  t.is(notArray.status, 400);
});

test('a batch over the item limit is 413', async (t) => {
  const keyId = await newKey('thread-cap');
  const items = Array.from({ length: 101 }, () => ({ key_id: keyId, plaintext: b64('x') }));
  const res = await postJson(base, '/encrypt', { batch_input: items });
  t.is(res.status, 413);
  t.is(res.json.error.code, 'PAYLOAD_TOO_LARGE');
  const atLimit = await postJson(base, '/encrypt', { batch_input: items.slice(1) });
  t.is(atLimit.status, 200);
});

test('bodies over the limit are 413, declared or streamed', async (t) => {
  const big = JSON.stringify({ key_id: 'k', plaintext: b64(Buffer.alloc(70_000)) });
  const declared = await postJson(base, '/encrypt', big);
  t.is(declared.status, 413);
  t.is(declared.json.error.code, 'PAYLOAD_TOO_LARGE');
  const streamed = await request(base, '/encrypt', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'transfer-encoding': 'chunked' },
    body: big,
  });
  t.is(streamed.status, 413);
});

test('malformed JSON, base64 and missing fields are 400 with a stable code', async (t) => {
  const cases: [unknown, string][] = [
    ['{"key_id": ', 'MALFORMED_JSON'],
    ['[1,2]', 'INVALID_INPUT'],
    ['"str"', 'INVALID_INPUT'],
    [{ key_id: 'k', plaintext: 'QQ=' }, 'MALFORMED_BASE64'],
    [{ key_id: 'k', plaintext: 'QR==' }, 'MALFORMED_BASE64'],
    [{ key_id: 'k', plaintext: 'aGk_' }, 'MALFORMED_BASE64'],
    [{ key_id: 'k', plaintext: 12 }, 'INVALID_INPUT'],
    [{ plaintext: b64('x') }, 'INVALID_INPUT'],
    [{ key_id: '', plaintext: b64('x') }, 'INVALID_INPUT'],
    [{ key_id: 'k'.repeat(300), plaintext: b64('x') }, 'INVALID_INPUT'],
  ];
  for (const [body, code] of cases) {
    const res = await postJson(base, '/encrypt', body);
    t.is(res.status, 400, JSON.stringify(body).slice(0, 40));
    t.is(res.json.error.code, code);
    t.is(typeof res.json.error.message, 'string');
  }
});

test('a wrong or missing content type is 415', async (t) => {
  const wrong = await request(base, '/encrypt', {
    method: 'POST',
    headers: { 'content-type': 'text/plain' },
    body: '{}',
  });
  t.is(wrong.status, 415);
  t.is(wrong.json.error.code, 'UNSUPPORTED_MEDIA_TYPE');
  const missing = await request(base, '/decrypt', { method: 'POST', body: '{}' });
  t.is(missing.status, 415);
  const withCharset = await request(base, '/create_dek_for_thread', {
    method: 'POST',
    headers: { 'content-type': 'Application/JSON; charset=utf-8' },
    body: '{"thread_id":"t-charset"}',
  });
  t.is(withCharset.status, 200);
});

test('unknown routes are 404 and wrong methods 405 with Allow, both as JSON errors', async (t) => {
  const unknown = await request(base, '/nope');
  t.is(unknown.status, 404);
  t.is(unknown.json.error.code, 'NOT_FOUND');
  const getEncrypt = await request(base, '/encrypt');
  t.is(getEncrypt.status, 405);
  t.is(getEncrypt.json.error.code, 'METHOD_NOT_ALLOWED');
  t.is(getEncrypt.headers.allow, 'POST');
  const putHealthz = await request(base, '/healthz', { method: 'PUT' });
  t.is(putHealthz.status, 405);
  const deleteRotate = await request(base, '/rotate_kek', { method: 'DELETE' });
  t.is(deleteRotate.status, 405);
  t.regex(deleteRotate.headers.allow!, /GET/);
  t.regex(deleteRotate.headers.allow!, /POST/);
});

test('DEK lifecycle: rotate_dek, reencrypt, destroy_dek_versions_before, destroy_dek', async (t) => {
  const keyId = await newKey('thread-lifecycle');
  const v1 = await postJson(base, '/encrypt', { key_id: keyId, plaintext: b64('old'), aad: b64('a') });
  const rotated = await postJson(base, '/rotate_dek', { key_id: keyId });
  t.is(rotated.status, 200);
  t.is(rotated.json.key_version, '2');
  const re = await postJson(base, '/reencrypt', {
    key_id: keyId,
    ciphertext: v1.json.ciphertext,
    aad: b64('a'),
  });
  t.is(re.status, 200);
  t.is(re.json.key_version, '2');
  const destroyOld = await postJson(base, '/destroy_dek_versions_before', {
    key_id: keyId,
    keep_from_version: '2',
  });
  t.is(destroyOld.status, 200);
  t.deepEqual(destroyOld.json, { key_id: keyId, destroyed_versions: '1' });
  const oldFails = await postJson(base, '/decrypt', {
    key_id: keyId,
    ciphertext: v1.json.ciphertext,
    aad: b64('a'),
  });
  t.is(oldFails.status, 422, JSON.stringify(oldFails.json));
  t.is(oldFails.json.error.code, 'DECRYPT_FAILED');
  const newWorks = await postJson(base, '/decrypt', {
    key_id: keyId,
    ciphertext: re.json.ciphertext,
    aad: b64('a'),
  });
  t.is(Buffer.from(newWorks.json.plaintext, 'base64').toString(), 'old');
  const badVersion = await postJson(base, '/destroy_dek_versions_before', {
    key_id: keyId,
    keep_from_version: -1,
  });
  t.is(badVersion.status, 400);
  const shredded = await postJson(base, '/destroy_dek', { key_id: keyId });
  t.is(shredded.status, 200);
  t.is(shredded.json.destroyed_versions, '2');
  const gone = await request(base, `/get_wrapped?key_id=${keyId}`);
  t.is(gone.status, 404);
});

test('POST /rotate_kek starts a rotation; GET /rotate_kek reports it; /rewrap uses the active KEK', async (t) => {
  const keyId = await newKey('thread-kek');
  const before = await request(base, `/get_wrapped?key_id=${keyId}`);
  const started = await postJson(base, '/rotate_kek', '');
  t.is(started.status, 200);
  allStrings(t, started.json);
  t.true(['running', 'completed'].includes(started.json.state));
  const done = await until('rotation completed', async () => {
    const s = await request(base, '/rotate_kek');
    return s.json.state === 'completed' && Number(s.json.active_kek_version) > Number(before.json.kek_version)
      ? s.json
      : undefined;
  });
  allStrings(t, done);
  t.is(done.done, done.total);
  t.notRegex(JSON.stringify(done), /master|"key"/i);
  const rewrapped = await postJson(base, '/rewrap', { key_id: keyId });
  t.is(rewrapped.status, 200);
  t.is(rewrapped.json.kek_version, done.active_kek_version);
  const missing = await postJson(base, '/rewrap', { key_id: 'dek_none' });
  t.is(missing.status, 404);
});

test.serial(
  'POST /rewrap refuses a caller-supplied KEK (the Go server sends new_kek_hex) with 400',
  async (t) => {
    const keyId = await newKey('thread-rewrap-kek');
    const before = await request(base, `/get_wrapped?key_id=${keyId}`);
    const res = await postJson(base, '/rewrap', { key_id: keyId, new_kek_hex: 'ab'.repeat(32) });
    t.is(res.status, 400);
    t.is(res.json.error.code, 'INVALID_INPUT');
    t.regex(res.json.error.message, /new_kek_hex/);
    t.regex(res.json.error.message, /never leaves the KMS/);
    t.regex(res.json.error.message, /\/rotate_kek/);
    const after = await request(base, `/get_wrapped?key_id=${keyId}`);
    t.is(after.json.wrapped, before.json.wrapped, 'nothing was rewrapped');
  },
);

test('the other single-item POST routes refuse unknown fields too', async (t) => {
  const keyId = await newKey('thread-strict');
  const ct = await postJson(base, '/encrypt', { key_id: keyId, plaintext: b64('x') });
  const cases: [string, Record<string, unknown>][] = [
    ['/create_dek_for_thread', { thread_id: 'thread-strict-2', kek: 'x' }],
    ['/rotate_dek', { key_id: keyId, version: '9' }],
    ['/reencrypt', { key_id: keyId, ciphertext: ct.json.ciphertext, add: b64('typo') }],
    ['/destroy_dek_versions_before', { key_id: keyId, keep_from_version: '1', force: true }],
    ['/destroy_dek', { key_id: keyId, hard: true }],
  ];
  for (const [route, body] of cases) {
    const res = await postJson(base, route, body);
    t.is(res.status, 400, route);
    t.is(res.json.error.code, 'INVALID_INPUT', route);
    t.regex(res.json.error.message, /is not accepted here/, route);
  }
  const still = await request(base, `/get_wrapped?key_id=${keyId}`);
  t.is(still.status, 200, 'destroy_dek with an unknown field destroyed nothing');
  t.is(still.json.key_version, '1', 'rotate_dek with an unknown field rotated nothing');
});

/** `[[...[]...]]` opening `depth` arrays. */
const nested = (depth: number) => `${'['.repeat(depth)}${']'.repeat(depth)}`;

test('bodies nested deeper than 64 levels are 400 INVALID_INPUT, brackets inside strings do not count', async (t) => {
  const keyId = await newKey('thread-depth');
  const body = (extra: string) => `{"key_id":"${keyId}","plaintext":"${b64('x')}","x":${extra}}`;
  // The body object is level 1, so its field holds 63 more at the limit.
  const atLimit = await postJson(base, '/encrypt', body(nested(63)));
  t.is(atLimit.status, 200, atLimit.text);
  for (const depth of [64, 4200]) {
    const over = await postJson(base, '/encrypt', body(nested(depth)));
    t.is(over.status, 400, `depth ${depth + 1}`);
    t.is(over.json.error.code, 'INVALID_INPUT');
    t.regex(over.json.error.message, /nested deeper than 64 levels/);
  }
  const inStrings = JSON.stringify({
    key_id: keyId,
    plaintext: b64('x'),
    x: '['.repeat(5000),
    y: `\\"${'{'.repeat(100)}\\`,
    z: [`"[[[\\`, nested(60)],
  });
  const fine = await postJson(base, '/encrypt', inStrings);
  t.is(fine.status, 200, fine.text);
});

test('GET /health describes the KMS; GET /metrics exposes counts, errors, latency, pool and rotation', async (t) => {
  const health = await request(base, '/health');
  t.is(health.status, 200);
  allStrings(t, health.json);
  t.is(health.json.ok, 'true');
  await postJson(base, '/encrypt', { key_id: 'dek_missing_for_metrics', plaintext: b64('x') });
  const metrics = await request(base, '/metrics');
  t.is(metrics.status, 200);
  t.regex(metrics.headers['content-type']!, /text\/plain/);
  const text = metrics.text;
  t.regex(text, /progressdb_kms_requests_total\{op="encrypt",transport="http",outcome="client_error"\} \d+/);
  t.regex(text, /progressdb_kms_errors_total\{code="KEY_NOT_FOUND",transport="http"\} \d+/);
  t.regex(text, /progressdb_kms_request_duration_seconds_bucket\{le="0.005",op="encrypt",transport="http"\}/);
  t.regex(text, /progressdb_kms_pool_queue_depth \d+/);
  t.regex(text, /progressdb_kms_rotation_done \d+/);
  t.regex(text, /progressdb_kms_rotation_total \d+/);
  t.regex(text, /progressdb_kms_ready 1/);
});

test('HEAD on a GET route works; responses never carry a stack trace', async (t) => {
  const head = await request(base, '/healthz', { method: 'HEAD' });
  t.is(head.status, 200);
  const bad = await postJson(base, '/encrypt', '{"key_id": "k", "plaintext": ');
  t.notRegex(bad.text, /at .*\.(js|ts)/);
});
