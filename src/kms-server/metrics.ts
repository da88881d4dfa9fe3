/**
 * Prometheus metrics for the daemon, on a registry of its own (never the global one, so two
 * daemons in one process, as in tests, do not collide). Labelled children are cached: the hot
 * path does one Map lookup instead of prom-client hashing the label set on every call.
 */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import type { CodedError } from '../errors.js';
import type { KmsHealth } from '../protocol.js';

export type Transport = 'http' | 'bridge';
type Outcome = 'ok' | 'client_error' | 'server_error';

const PREFIX = 'progressdb_kms_';

interface OpChildren {
  duration: { observe(seconds: number): void };
  ok: { inc(): void };
  clientError: { inc(): void };
  serverError: { inc(): void };
}

export class DaemonMetrics {
  readonly registry = new Registry();
  private readonly requests: Counter<'op' | 'transport' | 'outcome'>;
  private readonly errors: Counter<'code' | 'transport'>;
  private readonly duration: Histogram<'op' | 'transport'>;
  private readonly health: Record<string, Gauge>;
  private readonly bridgeConnections: Gauge;
  private readonly children = new Map<string, OpChildren>();
  private readonly errorChildren = new Map<string, { inc(): void }>();

  constructor() {
    const registers = [this.registry];
    this.requests = new Counter({
      name: `${PREFIX}requests_total`,
      help: 'KMS requests handled, by operation, transport and outcome',
      labelNames: ['op', 'transport', 'outcome'],
      registers,
    });
    this.errors = new Counter({
      name: `${PREFIX}errors_total`,
      help: 'Errors answered (whole requests and batch items), by error code and transport',
      labelNames: ['code', 'transport'],
      registers,
    });
    this.duration = new Histogram({
      name: `${PREFIX}request_duration_seconds`,
      help: 'Time to answer a KMS request, by operation and transport',
      labelNames: ['op', 'transport'],
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers,
    });
    const gauge = (name: string, help: string) => new Gauge({ name: `${PREFIX}${name}`, help, registers });
    this.health = {
      ready: gauge('ready', '1 when the worker pool and store are ready'),
      queueDepth: gauge('pool_queue_depth', 'Operations waiting for a crypto worker'),
      poolThreads: gauge('pool_threads', 'Crypto worker threads'),
      deks: gauge('deks', 'DEK records stored'),
      activeKekVersion: gauge('active_kek_version', 'Version of the active KEK'),
      rotationRunning: gauge('rotation_running', '1 while a KEK rotation is running'),
      rotationDone: gauge('rotation_done', 'DEK records examined by the current or last KEK rotation'),
      rotationTotal: gauge('rotation_total', 'DEK records to examine in the current or last KEK rotation'),
    };
    this.bridgeConnections = gauge('bridge_connections', 'Open TCP bridge connections');
    collectDefaultMetrics({ register: this.registry, prefix: PREFIX });
  }

  private childrenOf(op: string, transport: Transport): OpChildren {
    const key = `${op}\u0000${transport}`;
    let c = this.children.get(key);
    if (!c) {
      c = {
        duration: this.duration.labels(op, transport),
        ok: this.requests.labels(op, transport, 'ok'),
        clientError: this.requests.labels(op, transport, 'client_error'),
        serverError: this.requests.labels(op, transport, 'server_error'),
      };
      this.children.set(key, c);
    }
    return c;
  }

  /** Records one answered request; `startedAt` is from performance.now(). */
  observe(op: string, transport: Transport, startedAt: number, error?: CodedError): void {
    const c = this.childrenOf(op, transport);
    c.duration.observe((performance.now() - startedAt) / 1000);
    if (!error) {
      c.ok.inc();
      return;
    }
    const outcome: Outcome = error.status < 500 ? 'client_error' : 'server_error';
    (outcome === 'client_error' ? c.clientError : c.serverError).inc();
    this.itemError(error.code, transport);
  }

  /** Counts an error answered for one item of a batch (or a whole request). */
  itemError(code: string, transport: Transport): void {
    const key = `${code}\u0000${transport}`;
    let c = this.errorChildren.get(key);
    if (!c) {
      c = this.errors.labels(code, transport);
      this.errorChildren.set(key, c);
    }
    c.inc();
  }

  bridgeConnectionOpened(): void {
    this.bridgeConnections.inc();
  }

  bridgeConnectionClosed(): void {
    this.bridgeConnections.dec();
  }

  /** Copies a health snapshot into the gauges; called just before a scrape is rendered. */
  setHealth(h: KmsHealth | null): void {
    const g = this.health;
    g.ready!.set(h?.ok ? 1 : 0);
    if (!h) return;
    g.queueDepth!.set(h.queueDepth);
    g.poolThreads!.set(h.poolThreads);
    g.deks!.set(h.dekCount);
    g.activeKekVersion!.set(h.activeKekVersion);
    g.rotationRunning!.set(h.rotation.state === 'running' ? 1 : 0);
    g.rotationDone!.set(h.rotation.done);
    g.rotationTotal!.set(h.rotation.total);
  }

  render(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
