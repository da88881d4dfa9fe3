/**
 * Prometheus metrics for the daemon, on a registry of its own (never the global one, so two
 * daemons in one process, as in tests, do not collide).
 *
 * The per-request series are tallied in plain arrays and handed to prom-client only when
 * /metrics is scraped: prom-client hashes the label set on every observe() and inc(), even on a
 * `.labels()` child, which cost about a microsecond per request. Counters are flushed into
 * prom-client Counters (inc by the tally) from their collect() hook; the duration histogram is a
 * small metric of our own that renders the same series prom-client's Histogram would.
 */
import { Counter, collectDefaultMetrics, Gauge, type Metric, Registry } from 'prom-client';
import type { KmsHealth } from '../api/index.js';
import type { CodedError } from '../errors.js';

export type Transport = 'http' | 'bridge';
/** Why a listener closed a connection itself (see serve.ts and bridge.ts). */
export type CloseReason = 'per_address_limit' | 'auth_timeout' | 'idle' | 'frame_budget';
type Outcome = 'ok' | 'client_error' | 'server_error';

const PREFIX = 'progressdb_kms_';

const DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5];

/** Tallies of one (op, transport) since the last scrape, plus its histogram (never reset). */
interface OpSeries {
  op: string;
  transport: Transport;
  /** Not yet flushed into the requests counter: ok, client_error, server_error. */
  ok: number;
  clientError: number;
  serverError: number;
  /** Per bucket (non-cumulative), the last slot is +Inf. */
  buckets: Float64Array;
  sum: number;
  count: number;
}

interface ErrorSeries {
  code: string;
  transport: Transport;
  pending: number;
}

type MetricValue = { labels: Record<string, string | number>; value: number; metricName?: string };

/** A histogram rendered like prom-client's, fed from OpSeries without hashing labels. */
class DurationHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly series: () => Iterable<OpSeries>,
  ) {}

  get(): Promise<{ name: string; help: string; type: string; values: MetricValue[]; aggregator: string }> {
    const values: MetricValue[] = [];
    const bucket = `${this.name}_bucket`;
    for (const s of this.series()) {
      const labels = { op: s.op, transport: s.transport };
      let acc = 0;
      // In bounds: buckets holds one slot per DURATION_BUCKETS entry plus the +Inf slot.
      for (let i = 0; i < DURATION_BUCKETS.length; i++) {
        acc += s.buckets[i] as number;
        values.push({
          labels: { le: DURATION_BUCKETS[i] as number, ...labels },
          value: acc,
          metricName: bucket,
        });
      }
      values.push({ labels: { le: '+Inf', ...labels }, value: s.count, metricName: bucket });
      values.push({ labels, value: s.sum, metricName: `${this.name}_sum` });
      values.push({ labels, value: s.count, metricName: `${this.name}_count` });
    }
    return Promise.resolve({
      name: this.name,
      help: this.help,
      type: this.type,
      values,
      aggregator: this.aggregator,
    });
  }

  reset(): void {}
}

export class DaemonMetrics {
  readonly registry = new Registry();
  private readonly health: Record<
    | 'ready'
    | 'queueDepth'
    | 'poolThreads'
    | 'deks'
    | 'activeKekVersion'
    | 'rotationRunning'
    | 'rotationDone'
    | 'rotationTotal'
    | 'rotationNextDue'
    | 'keyMemoryLocked'
    | 'keyMemoryUnlocked',
    Gauge
  >;
  private readonly bridgeConnections: Gauge;
  private readonly closedConnections: Counter;
  /** Bytes of unfinished bridge frames held now; set by the bridge listener. */
  bufferedFrameBytes: () => number = () => 0;
  private readonly series = new Map<string, OpSeries>();
  private readonly errorSeries = new Map<string, ErrorSeries>();

  constructor() {
    const registers = [this.registry];
    const series = this.series;
    const errorSeries = this.errorSeries;
    new Counter({
      name: `${PREFIX}requests_total`,
      help: 'KMS requests handled, by operation, transport and outcome',
      labelNames: ['op', 'transport', 'outcome'],
      registers,
      collect() {
        for (const s of series.values()) {
          const { op, transport } = s;
          if (s.ok > 0) this.inc({ op, transport, outcome: 'ok' }, s.ok);
          if (s.clientError > 0) this.inc({ op, transport, outcome: 'client_error' }, s.clientError);
          if (s.serverError > 0) this.inc({ op, transport, outcome: 'server_error' }, s.serverError);
          s.ok = s.clientError = s.serverError = 0;
        }
      },
    });
    new Counter({
      name: `${PREFIX}errors_total`,
      help: 'Errors answered (whole requests and batch items), by error code and transport',
      labelNames: ['code', 'transport'],
      registers,
      collect() {
        for (const e of errorSeries.values()) {
          if (e.pending > 0) this.inc({ code: e.code, transport: e.transport }, e.pending);
          e.pending = 0;
        }
      },
    });
    this.registry.registerMetric(
      new DurationHistogram(
        `${PREFIX}request_duration_seconds`,
        'Time to answer a KMS request, by operation and transport',
        () => series.values(),
      ) as unknown as Metric,
    );
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
      keyMemoryLocked: gauge(
        'key_memory_locked_bytes',
        "Bytes of the crypto workers' key slots locked in RAM",
      ),
      keyMemoryUnlocked: gauge(
        'key_memory_unlocked_bytes',
        "Bytes of the crypto workers' key slots the system refused to lock (RLIMIT_MEMLOCK): swappable",
      ),
      rotationNextDue: gauge(
        'kek_rotation_next_due_timestamp_seconds',
        'When the active KEK falls due for its scheduled rotation (Unix time; absent without a period)',
      ),
    };
    this.bridgeConnections = gauge('bridge_connections', 'Open TCP bridge connections');
    const metrics = this;
    new Gauge({
      name: `${PREFIX}bridge_buffered_frame_bytes`,
      help: 'Bytes held in unfinished bridge frames, all connections together',
      registers,
      collect() {
        this.set(metrics.bufferedFrameBytes());
      },
    });
    this.closedConnections = new Counter({
      name: `${PREFIX}connections_closed_total`,
      help: 'Connections the daemon closed itself, by listener and reason',
      labelNames: ['listener', 'reason'],
      registers,
    });
    collectDefaultMetrics({ register: this.registry, prefix: PREFIX });
  }

  private seriesOf(op: string, transport: Transport): OpSeries {
    const key = transport === 'http' ? op : `${op}\u0000bridge`;
    let s = this.series.get(key);
    if (!s) {
      s = {
        op,
        transport,
        ok: 0,
        clientError: 0,
        serverError: 0,
        buckets: new Float64Array(DURATION_BUCKETS.length + 1),
        sum: 0,
        count: 0,
      };
      this.series.set(key, s);
    }
    return s;
  }

  /** Records one answered request; `startedAt` is from performance.now(). */
  observe(op: string, transport: Transport, startedAt: number, error?: CodedError): void {
    const s = this.seriesOf(op, transport);
    const seconds = (performance.now() - startedAt) / 1000;
    let b = 0;
    // In bounds: b stops at DURATION_BUCKETS.length, the last (+Inf) slot of buckets.
    while (b < DURATION_BUCKETS.length && seconds > (DURATION_BUCKETS[b] as number)) b++;
    s.buckets[b] = (s.buckets[b] as number) + 1;
    s.sum += seconds;
    s.count++;
    if (!error) {
      s.ok++;
      return;
    }
    const outcome: Outcome = error.status < 500 ? 'client_error' : 'server_error';
    if (outcome === 'client_error') s.clientError++;
    else s.serverError++;
    this.itemError(error.code, transport);
  }

  /** Counts an error answered for one item of a batch (or a whole request). */
  itemError(code: string, transport: Transport): void {
    const key = `${code}\u0000${transport}`;
    let e = this.errorSeries.get(key);
    if (!e) {
      e = { code, transport, pending: 0 };
      this.errorSeries.set(key, e);
    }
    e.pending++;
  }

  bridgeConnectionOpened(): void {
    this.bridgeConnections.inc();
  }

  bridgeConnectionClosed(): void {
    this.bridgeConnections.dec();
  }

  /** Counts a connection the daemon closed on its own (refused, idle, no AUTH, frame budget). */
  connectionClosed(listener: Transport, reason: CloseReason): void {
    this.closedConnections.inc({ listener, reason });
  }

  /** Copies a health snapshot into the gauges; called just before a scrape is rendered. */
  setHealth(h: KmsHealth | null): void {
    const g = this.health;
    g.ready.set(h?.ok ? 1 : 0);
    if (!h) return;
    g.queueDepth.set(h.queueDepth);
    g.poolThreads.set(h.poolThreads);
    g.deks.set(h.dekCount);
    g.activeKekVersion.set(h.activeKekVersion);
    g.rotationRunning.set(h.rotation.state === 'running' ? 1 : 0);
    g.rotationDone.set(h.rotation.done);
    g.rotationTotal.set(h.rotation.total);
    const due = h.nextRotationDueAt == null ? Number.NaN : Date.parse(h.nextRotationDueAt);
    if (Number.isFinite(due)) g.rotationNextDue.set(due / 1000);
    else g.rotationNextDue.reset();
    if (h.keyMemory !== undefined) {
      g.keyMemoryLocked.set(h.keyMemory.lockedBytes);
      g.keyMemoryUnlocked.set(h.keyMemory.unlockedBytes);
    }
  }

  render(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
