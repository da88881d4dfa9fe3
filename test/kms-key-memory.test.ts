/**
 * Key memory in the workers: locked (mlock) when the system allows it, reported in health; when
 * RLIMIT_MEMLOCK refuses, the KMS still starts, warns once naming the limit, and says so in
 * health. And a key cache far smaller than a batch's keys never serves a zeroed or reused slot.
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import test from 'ava';
import { openKms, ROOT, startProcess, tempDir, writeMasterKey, writeScript } from './helpers/kms.js';

const CHILD = `import { createKms } from 'KMS_MODULE';
import { createLogger } from 'LOG_MODULE';
const [dataDir, keyFile] = process.argv.slice(2);
const kms = await createKms({ dataDir, masterKeyFile: keyFile, poolSize: 2, logger: createLogger('kms') });
const dek = await kms.createDekForThread('t1');
const { ciphertext } = await kms.encrypt(dek.keyId, Buffer.from('still works'));
const plain = (await kms.decrypt(dek.keyId, ciphertext)).toString();
const health = await kms.health();
await kms.close();
console.log(JSON.stringify({ plain, keyMemory: health.keyMemory }));
`;

const ARENA_BYTES = 32 * (10_000 + 1024);

async function runWithMemlock(t: Parameters<typeof tempDir>[0], limitBytes: number | null) {
  const dir = tempDir(t);
  const { file } = writeMasterKey(dir);
  const logModule = pathToFileURL(path.join(ROOT, 'src/log.ts')).href;
  const script = writeScript(dir, 'key-memory', CHILD.replace('LOG_MODULE', logModule));
  const node = [process.execPath, '--import=tsx', script, path.join(dir, 'kms'), file];
  const run = async (command: string[]) => {
    const exit = await startProcess(t, command[0] as string, command.slice(1)).exited;
    if (exit.code !== 0) throw new Error(`child exited ${exit.code ?? exit.signal}: ${exit.stderr}`);
    return exit;
  };
  if (limitBytes === null) return run(node);
  // root has CAP_IPC_LOCK, which ignores the limit: drop it from the child so the limit applies.
  const dropCap =
    process.getuid?.() === 0 ? ['setpriv', '--inh-caps=-ipc_lock', '--bounding-set=-ipc_lock'] : [];
  const command = [...dropCap, 'prlimit', `--memlock=${limitBytes}`, ...node];
  return run(command);
}

test('with RLIMIT_MEMLOCK too small, the KMS starts, warns once naming the limit, and health says unlocked', async (t) => {
  const { stdout, stderr } = await runWithMemlock(t, 64 * 1024);
  const result = JSON.parse(stdout.trim().split('\n').at(-1) as string) as {
    plain: string;
    keyMemory: { lockedBytes: number; unlockedBytes: number };
  };
  t.is(result.plain, 'still works');
  t.is(result.keyMemory.lockedBytes, 0);
  t.is(result.keyMemory.unlockedBytes, 2 * ARENA_BYTES, 'both workers report their whole arena');
  const warnings = `${stdout}\n${stderr}`.split('\n').filter((l) => l.includes('key memory is NOT locked'));
  t.is(warnings.length, 1, 'one warning, not one per worker');
  t.regex(warnings[0] as string, /RLIMIT_MEMLOCK 64 KiB/);
  t.regex(warnings[0] as string, /LimitMEMLOCK=/);
});

test('with room to lock, every key slot is locked and nothing is reported unlocked', async (t) => {
  const { stdout, stderr } = await runWithMemlock(t, process.getuid?.() === 0 ? null : 8 * 1024 * 1024);
  const result = JSON.parse(stdout.trim().split('\n').at(-1) as string) as {
    keyMemory: { lockedBytes: number; unlockedBytes: number };
  };
  t.deepEqual(result.keyMemory, { lockedBytes: 2 * ARENA_BYTES, unlockedBytes: 0 });
  t.false(`${stdout}${stderr}`.includes('NOT locked'));
});

test('a key cache of 2 serves batches over many keys correctly (keys pinned while their task runs)', async (t) => {
  const { kms } = await openKms(t, { dekCacheSize: 2, poolSize: 1 });
  const deks = await Promise.all(Array.from({ length: 12 }, (_, i) => kms.createDekForThread(`pin-${i}`)));
  // Interleaved so that every batch needs each key again after more than two others.
  const items = Array.from({ length: 96 }, (_, i) => {
    const dek = deks[i % deks.length] as (typeof deks)[number];
    return { keyId: dek.keyId, plaintext: Buffer.from(`message ${i}`), aad: Buffer.from(`aad ${i}`) };
  });
  const encrypted = await kms.encryptBatch(items);
  const decrypted = await kms.decryptBatch(
    encrypted.map((r, i) => {
      if (!r.ok) throw r.error;
      return { keyId: items[i]?.keyId as string, ciphertext: r.value.ciphertext, aad: items[i]?.aad };
    }),
  );
  for (const [i, r] of decrypted.entries()) {
    t.deepEqual(r, { ok: true, value: Buffer.from(`message ${i}`) }, `item ${i}`);
  }
  // A single op in a task of its own agrees: the batch's ciphertexts were made under the real keys.
  const [one] = encrypted;
  if (!one?.ok) throw new Error('first item failed');
  t.is(
    (await kms.decrypt(deks[0]?.keyId as string, one.value.ciphertext, Buffer.from('aad 0'))).toString(),
    'message 0',
  );
});
