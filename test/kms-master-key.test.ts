/**
 * The master key as the worker reads it: the hex decoder that never makes a string of a key file,
 * the zeroing of the raw file bytes, and the refusal of key files that group or others can access.
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { loadDaemonConfig } from '../src/config/daemon.js';
import { createKms } from '../src/kms/index.js';
import { WorkerFault } from '../workers/fault.js';
import { decodeHexKey, masterKeyFromBytes } from '../workers/master-key.js';
import { expectCode, randomKeyHex, tempDir, writeMasterKey } from './helpers/kms.js';

const WHAT = 'test key';

test('decodeHexKey: 64 hex characters of either case, trimmed of surrounding whitespace', (t) => {
  const hex = randomKeyHex();
  const expected = Buffer.from(hex, 'hex');
  const forms = [hex, hex.toUpperCase(), `${hex}\n`, `${hex}\r\n`, ` \t${hex.toUpperCase()}\n\n`];
  for (const form of forms) {
    t.deepEqual(decodeHexKey(Buffer.from(form, 'latin1'), WHAT), expected, JSON.stringify(form));
    t.deepEqual(decodeHexKey(form, WHAT), expected, `as a string: ${JSON.stringify(form)}`);
  }
  t.deepEqual(
    decodeHexKey('0123456789abcdefABCDEF'.padEnd(64, '0'), WHAT).subarray(0, 11),
    Buffer.from('0123456789abcdefabcdef', 'hex'),
  );
});

test('decodeHexKey: wrong length or a non-hex character is MASTER_KEY_INVALID, without the value', (t) => {
  const hex = randomKeyHex();
  const bad: Record<string, string | Buffer> = {
    empty: '',
    'only whitespace': ' \n',
    '63 characters': hex.slice(1),
    '65 characters': `${hex}a`,
    '62 characters': hex.slice(2),
    'a g': `${hex.slice(0, 63)}g`,
    'a space inside': `${hex.slice(0, 32)} ${hex.slice(33)}`,
    '0x prefix': `0x${hex.slice(2)}`,
    'a byte above ASCII': Buffer.concat([Buffer.from(hex.slice(0, 63)), Buffer.from([0xe6])]),
    'a character above ASCII': `${hex.slice(0, 63)}\u0661`,
  };
  for (const [what, source] of Object.entries(bad)) {
    const input = typeof source === 'string' ? Buffer.from(source, 'utf8') : source;
    for (const form of [input, typeof source === 'string' ? source : input]) {
      const err = t.throws(
        () => decodeHexKey(form, WHAT),
        { instanceOf: WorkerFault, message: /^test key / },
        what,
      );
      t.is(err?.error.code, 'MASTER_KEY_INVALID', what);
      t.false(err?.message.includes(hex.slice(4, 20)), `${what}: the message does not quote the key`);
    }
  }
});

test('masterKeyFromBytes zeroes the raw bytes it decoded, and those it refused', (t) => {
  const hex = randomKeyHex();
  const raw = Buffer.from(`${hex}\n`);
  t.deepEqual(masterKeyFromBytes(raw, WHAT), Buffer.from(hex, 'hex'));
  t.true(
    raw.every((b) => b === 0),
    'raw bytes zeroed after a good key',
  );
  const bad = Buffer.from(`${hex.slice(1)}\n`);
  const err = t.throws(() => masterKeyFromBytes(bad, WHAT), { instanceOf: WorkerFault });
  t.is(err?.error.code, 'MASTER_KEY_INVALID');
  t.true(
    bad.every((b) => b === 0),
    'raw bytes zeroed after a bad key',
  );
});

test('a key file that group or others can access is refused with MASTER_KEY_FILE_OPEN', async (t) => {
  const dir = tempDir(t);
  const dataDir = path.join(dir, 'kms');
  const { file, hex } = writeMasterKey(dir);
  for (const mode of [0o644, 0o640, 0o604, 0o620, 0o602]) {
    fs.chmodSync(file, mode);
    const err = await expectCode(
      t,
      createKms({ dataDir, masterKeyFile: file, poolSize: 1 }),
      'MASTER_KEY_FILE_OPEN',
      mode.toString(8),
    );
    t.regex(err?.message ?? '', new RegExp(`mode ${mode.toString(8)}`));
    t.false(err?.message.includes(hex.slice(0, 16)), 'the message does not quote the key');
  }
  // Allowed explicitly, the same file opens the directory.
  const kms = await createKms({ dataDir, masterKeyFile: file, poolSize: 1, allowOpenKeyFile: true });
  t.true((await kms.health()).ok);
  await kms.close();
  // 0600 and 0400 need no permission.
  for (const mode of [0o600, 0o400]) {
    fs.chmodSync(file, mode);
    const again = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
    await again.close();
  }
  t.pass();
});

test.serial(
  'PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE accepts an open key file; the daemon has a flag',
  async (t) => {
    const dir = tempDir(t);
    const dataDir = path.join(dir, 'kms');
    const { file } = writeMasterKey(dir);
    fs.chmodSync(file, 0o644);
    process.env.PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE = 'true';
    t.teardown(() => {
      delete process.env.PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE;
    });
    const kms = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
    t.true((await kms.health()).ok);
    await kms.close();
    process.env.PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE = 'false';
    await expectCode(t, createKms({ dataDir, masterKeyFile: file, poolSize: 1 }), 'MASTER_KEY_FILE_OPEN');
    delete process.env.PROGRESSDB_KMS_ALLOW_OPEN_KEY_FILE;

    const config = loadDaemonConfig({ dataDir, masterKeyFile: file, allowOpenKeyFile: true });
    t.true(config.kms.allowOpenKeyFile);
    t.is(loadDaemonConfig({ dataDir, masterKeyFile: file }).kms.allowOpenKeyFile, undefined);
  },
);

test('master_key in a config file: the worker reads the located bytes, however the value is written', async (t) => {
  const dir = tempDir(t);
  const dataDir = path.join(dir, 'kms');
  const { file, hex } = writeMasterKey(dir);
  const first = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
  const dek = await first.createDekForThread('config-key');
  const sealed = await first.encrypt(dek.keyId, Buffer.from('hello'));
  await first.close();
  const config = path.join(dir, 'kms.yaml');
  // Multi-byte text before the key: the location is in bytes, not characters.
  const layouts = [
    `# clé maîtresse ✓\nmaster_key: "${hex}"\n`,
    `master_key: '${hex}'\npool_size: 1\n`,
    `data_dir: ${dataDir}\nmaster_key: ${hex}   # trailing comment\n`,
    `{"master_key": "${hex.toUpperCase()}"}`,
  ];
  for (const layout of layouts) {
    fs.writeFileSync(config, layout, { mode: 0o600 });
    const kms = await createKms({ dataDir, masterKeyConfigFile: config, poolSize: 1 });
    t.is((await kms.decrypt(dek.keyId, sealed.ciphertext)).toString(), 'hello', layout);
    await kms.close();
  }
  // A key that is not 64 hex characters on its line is refused, without the value in the message.
  fs.writeFileSync(config, `master_key: "${hex.slice(0, 60)}"\n`, { mode: 0o600 });
  const short = await expectCode(
    t,
    createKms({ dataDir, masterKeyConfigFile: config, poolSize: 1 }),
    'MASTER_KEY_INVALID',
  );
  t.false(short?.message.includes(hex.slice(0, 16)));
  fs.writeFileSync(config, `master_key: |\n  ${hex}\n`, { mode: 0o600 });
  await expectCode(t, createKms({ dataDir, masterKeyConfigFile: config, poolSize: 1 }), 'CONFIG_INVALID');
  fs.writeFileSync(config, 'pool_size: 1\n', { mode: 0o600 });
  await expectCode(t, createKms({ dataDir, masterKeyConfigFile: config, poolSize: 1 }), 'MASTER_KEY_MISSING');
});
