/**
 * Files the KMS and the server store create are private to their owner whatever the umask: LMDB
 * alone would create its files 0664.
 */
import fs from 'node:fs';
import path from 'node:path';
import test from 'ava';
import { createKms } from '../src/kms/index.js';
import { Store } from '../src/server/store.js';
import { tempDir, writeMasterKey } from './helpers/kms.js';

const modeOf = (file: string) => (fs.statSync(file).mode & 0o777).toString(8);

// Every test here needs umask 000 (this file runs in a process of its own).
process.umask(0);

test('under umask 000 the KMS data dir is 0700 and every file in it 0600', async (t) => {
  const dir = tempDir(t);
  const { file } = writeMasterKey(dir);
  const dataDir = path.join(dir, 'kms');
  const kms = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
  await kms.createDekForThread('thread-modes');
  await kms.close();
  t.is(modeOf(dataDir), '700');
  const files = fs.readdirSync(dataDir);
  t.true(files.includes('registry.mdb') && files.includes('registry.mdb-lock'), files.join(' '));
  for (const name of files) t.is(modeOf(path.join(dataDir, name)), '600', name);

  // Files left 0644 by an older version are narrowed at the next open.
  for (const name of ['registry.mdb', 'registry.mdb-lock']) fs.chmodSync(path.join(dataDir, name), 0o644);
  const again = await createKms({ dataDir, masterKeyFile: file, poolSize: 1 });
  await again.close();
  for (const name of ['registry.mdb', 'registry.mdb-lock'])
    t.is(modeOf(path.join(dataDir, name)), '600', name);
});

test('under umask 000 the server store files are 0600 in a 0700 directory', async (t) => {
  const dataDir = path.join(tempDir(t), 'server');
  const store = Store.open(dataDir);
  await store.close();
  const dir = path.join(dataDir, 'store');
  t.is(modeOf(dir), '700');
  t.deepEqual(fs.readdirSync(dir).sort(), ['data.mdb', 'lock.mdb']);
  for (const name of fs.readdirSync(dir)) t.is(modeOf(path.join(dir, name)), '600', name);
});
