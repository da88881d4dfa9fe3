/** Bare Piscina worker for the latency baseline: returns its input untouched. */
export default function echo(value: unknown): unknown {
  return value;
}
