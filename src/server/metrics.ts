/** Prometheus metrics for one server process (its own registry, so tests can run several). */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';

export class ServerMetrics {
  readonly registry = new Registry();

  readonly requests = new Histogram({
    name: 'progressdb_http_request_duration_seconds',
    help: 'HTTP request latency by route and status',
    labelNames: ['method', 'route', 'status'] as const,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });

  readonly errors = new Counter({
    name: 'progressdb_errors_total',
    help: 'Errors returned to callers, by code',
    labelNames: ['code'] as const,
    registers: [this.registry],
  });

  readonly messagesWritten = new Counter({
    name: 'progressdb_messages_written_total',
    help: 'Messages created or updated, by whether the body was encrypted',
    labelNames: ['encrypted'] as const,
    registers: [this.registry],
  });

  readonly jobItems = new Counter({
    name: 'progressdb_job_messages_total',
    help: 'Messages rewritten by admin jobs',
    labelNames: ['job'] as const,
    registers: [this.registry],
  });

  readonly jobsRunning = new Gauge({
    name: 'progressdb_jobs_running',
    help: 'Admin jobs running now',
    labelNames: ['job'] as const,
    registers: [this.registry],
  });

  readonly kmsUp = new Gauge({
    name: 'progressdb_kms_up',
    help: '1 when the last KMS health check succeeded',
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'progressdb_' });
  }
}
