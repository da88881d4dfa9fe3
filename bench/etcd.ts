/**
 * Real etcd members for tests and benchmarks: a cluster of one or more members on free loopback
 * ports, each in its own temporary data dir, started from the system's etcd binary (Debian's
 * etcd-server; .ci/run installs it). Members are stopped by the pid we started, never by name.
 * Benchmarks import nothing from test/, so it lives here and test/helpers/etcd.ts re-exports it.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort, until } from './processes.js';

export const ETCD_BINARY = process.env.ETCD_BINARY ?? '/usr/bin/etcd';

// A harness or test that exits (or is interrupted) without stop() leaves no member behind.
const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

interface Member {
  name: string;
  clientUrl: string;
  peerUrl: string;
  dataDir: string;
  child: ChildProcess | null;
  log: string[];
}

export class EtcdCluster {
  private constructor(
    private readonly members: Member[],
    private readonly initialCluster: string,
    private readonly token: string,
  ) {}

  /** Starts `size` members and waits until the cluster answers a health check. */
  static async start(size = 1): Promise<EtcdCluster> {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'etcd-test-'));
    const members: Member[] = [];
    for (let i = 0; i < size; i++) {
      members.push({
        name: `m${i}`,
        clientUrl: `http://127.0.0.1:${await freePort()}`,
        peerUrl: `http://127.0.0.1:${await freePort()}`,
        dataDir: path.join(root, `m${i}`),
        child: null,
        log: [],
      });
    }
    const initialCluster = members.map((m) => `${m.name}=${m.peerUrl}`).join(',');
    const cluster = new EtcdCluster(members, initialCluster, path.basename(root));
    for (let i = 0; i < size; i++) cluster.startMember(i, 'new');
    await cluster.waitHealthy();
    return cluster;
  }

  /** Client URLs, one per member, e.g. for `etcd://` registry URLs. */
  get clientUrls(): string[] {
    return this.members.map((m) => m.clientUrl);
  }

  /** The registry URL a KMS replica is given: `etcd://host:port,host:port`. */
  get registryUrl(): string {
    return `etcd://${this.members.map((m) => new URL(m.clientUrl).host).join(',')}`;
  }

  private startMember(i: number, state: 'new' | 'existing'): void {
    const m = this.members[i];
    if (!m) throw new Error(`no member ${i}`);
    const args = [
      `--name=${m.name}`,
      `--data-dir=${m.dataDir}`,
      `--listen-client-urls=${m.clientUrl}`,
      `--advertise-client-urls=${m.clientUrl}`,
      `--listen-peer-urls=${m.peerUrl}`,
      `--initial-advertise-peer-urls=${m.peerUrl}`,
      `--initial-cluster=${this.initialCluster}`,
      `--initial-cluster-state=${state}`,
      `--initial-cluster-token=${this.token}`,
      '--logger=zap',
      '--log-level=error',
      // Loopback and small: short heartbeats make elections after a kill quick.
      '--heartbeat-interval=50',
      '--election-timeout=500',
    ];
    const child = spawn(ETCD_BINARY, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    running.add(child);
    child.once('exit', () => running.delete(child));
    child.stderr?.on('data', (chunk: Buffer) => {
      m.log.push(chunk.toString());
      if (m.log.length > 50) m.log.shift();
    });
    m.child = child;
  }

  /** Polls each running member's /health until all answer healthy. */
  async waitHealthy(timeoutMs = 20_000): Promise<void> {
    await until(
      'etcd members healthy',
      async () => {
        for (const m of this.members) {
          if (m.child === null) continue;
          try {
            const res = await fetch(`${m.clientUrl}/health`);
            const body = (await res.json()) as { health?: string };
            if (body.health !== 'true') return undefined;
          } catch {
            return undefined;
          }
        }
        return true;
      },
      timeoutMs,
    );
  }

  /** kill -9 one member (its data stays, so restart() brings it back as the same member). */
  async kill(i: number): Promise<void> {
    const m = this.members[i];
    const child = m?.child;
    if (!m || !child) return;
    m.child = null;
    await stopChild(child, 'SIGKILL');
  }

  async restart(i: number): Promise<void> {
    this.startMember(i, 'existing');
    await this.waitHealthy();
  }

  /** What the members wrote to stderr lately, for a failing test's message. */
  logs(): string {
    return this.members.map((m) => `${m.name}: ${m.log.join('')}`).join('\n');
  }

  async stop(): Promise<void> {
    await Promise.all(this.members.map((_, i) => this.kill(i)));
    const first = this.members[0];
    if (first) fs.rmSync(path.dirname(first.dataDir), { recursive: true, force: true });
  }
}

function stopChild(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', () => resolve());
    child.kill(signal);
  });
}
