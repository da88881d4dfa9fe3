/**
 * `npm run cluster:dev`: a KMS cluster on loopback to try things on: a 3-member etcd and three
 * progressdb-kms replicas (HTTP and TCP bridge each), sharing one development master key. One
 * line per process says where it listens; Ctrl-C stops them all. Everything lives in temporary
 * directories and is removed on exit. Not for production: the master key is a throwaway.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EtcdCluster } from './helpers/etcd.js';
import { type Daemon, keygen, spawnDaemon } from './helpers/kms-daemon.js';

const REPLICAS = 3;

async function main(): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'progressdb-cluster-dev-'));
  const etcd = await EtcdCluster.start(3);
  for (const [i, url] of etcd.clientUrls.entries()) console.log(`etcd member m${i}: ${url}`);
  const keyFile = await keygen(root);
  const replicas: Daemon[] = [];
  for (let i = 0; i < REPLICAS; i++) {
    const dir = path.join(root, `replica-${i}`);
    fs.mkdirSync(dir, { mode: 0o700 });
    fs.copyFileSync(keyFile, path.join(dir, 'master.key'));
    fs.chmodSync(path.join(dir, 'master.key'), 0o600);
    const daemon = await spawnDaemon({
      dir,
      bridgePort: 0,
      args: ['--registry', etcd.registryUrl, '--cluster', 'dev', '--replica-id', `dev-${i}`],
    });
    replicas.push(daemon);
    console.log(`replica ${i}: http://${daemon.http}  tcp://${daemon.bridge}  data ${daemon.dataDir}`);
  }
  const endpoints = replicas.map((d) => `http://${d.http}`).join(',');
  console.log(`\nclient: createRemoteKms({ endpoint: '${endpoints}' })`);
  console.log(`server: PROGRESSDB_KMS_MODE=external PROGRESSDB_KMS_ENDPOINT=${endpoints} npm start`);
  console.log('Ctrl-C stops the cluster.');

  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await Promise.all(replicas.map((d) => d.stop()));
    await etcd.stop();
    fs.rmSync(root, { recursive: true, force: true });
    console.log('cluster stopped');
    process.exit(0);
  };
  process.on('SIGINT', () => void stop());
  process.on('SIGTERM', () => void stop());
  for (const [i, d] of replicas.entries()) {
    void d.exited.then((e) => {
      if (!stopping) console.log(`replica ${i} exited (${e.code ?? e.signal}); the others go on`);
    });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
