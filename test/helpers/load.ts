/** Concurrent writers and readers for the fault tests: they record what the server acknowledged. */
import type { Client } from './server.js';

/** Posts `count` messages with `concurrency` in flight; returns id → body of the acknowledged ones. */
export async function seed(
  api: Client,
  threadId: string,
  count: number,
  concurrency = 8,
  bodyOf = (i: number): unknown => ({ n: i, text: `seed ${i}` }),
): Promise<Map<string, unknown>> {
  const acked = new Map<string, unknown>();
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < count) {
        const body = bodyOf(next++);
        const r = await api.postMessage(threadId, body);
        if (r.status !== 201) throw new Error(`seed: ${r.status} ${r.text}`);
        acked.set(r.body.id, body);
      }
    }),
  );
  return acked;
}

/**
 * Keeps writing (and optionally reading) until stopped. Writes that fail (server killed, KMS down)
 * are counted, not recorded: only acknowledged messages must survive.
 */
export class Traffic {
  readonly acked = new Map<string, unknown>();
  readonly writeStatuses = new Map<number, number>();
  readonly readProblems: string[] = [];
  reads = 0;
  private running = true;
  private readonly loops: Promise<void>[] = [];

  constructor(
    private readonly api: Client,
    private readonly threadId: string,
    opts: { writers?: number; readers?: number; tag?: string } = {},
  ) {
    const tag = opts.tag ?? 'traffic';
    let n = 0;
    for (let w = 0; w < (opts.writers ?? 1); w++) {
      this.loops.push(
        (async () => {
          while (this.running) {
            const body = { tag, n: n++ };
            let status = 0;
            try {
              const r = await this.api.postMessage(this.threadId, body);
              status = r.status;
              if (r.status === 201) this.acked.set(r.body.id, body);
            } catch {
              status = -1; // connection refused or reset
            }
            this.writeStatuses.set(status, (this.writeStatuses.get(status) ?? 0) + 1);
            if (status !== 201) await new Promise((r) => setTimeout(r, 10)); // a down server is not busy-looped
          }
        })(),
      );
    }
    for (let r = 0; r < (opts.readers ?? 0); r++) {
      this.loops.push(
        (async () => {
          while (this.running) {
            try {
              await this.readOnce();
            } catch {
              this.readProblems.push('connection failed');
              await new Promise((r) => setTimeout(r, 10));
            }
          }
        })(),
      );
    }
  }

  private async readOnce(): Promise<void> {
    const page = await this.api.get(`/v1/threads/${this.threadId}/messages?limit=50`);
    this.reads++;
    if (page.status !== 200) {
      this.readProblems.push(`page ${page.status}`);
      return;
    }
    for (const m of page.body.messages) if (m.error) this.readProblems.push(`${m.id} ${m.error.code}`);
    const ids = [...this.acked.keys()];
    const pick = ids[Math.floor(Math.random() * ids.length)];
    if (pick) {
      const one = await this.api.get(`/v1/threads/${this.threadId}/messages/${pick}`);
      if (one.status !== 200) this.readProblems.push(`get ${pick} ${one.status}`);
    }
  }

  async stop(): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
  }
}

/** Checks that every acknowledged message is present and decrypts to what was written. */
export async function missingOrWrong(api: Client, threadId: string, expected: Map<string, unknown>) {
  const stored = new Map((await api.allMessages(threadId)).map((m) => [m.id as string, m]));
  const problems: string[] = [];
  for (const [id, body] of expected) {
    const m = stored.get(id);
    if (!m) problems.push(`${id} missing`);
    else if (m.error) problems.push(`${id} ${m.error.code}`);
    else if (JSON.stringify(m.body) !== JSON.stringify(body)) problems.push(`${id} wrong body`);
  }
  for (const m of stored.values()) if (m.error) problems.push(`${m.id} unreadable ${m.error.code}`);
  return { problems, stored };
}
