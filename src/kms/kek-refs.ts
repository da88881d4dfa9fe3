/** The KekRefs the main thread sends the workers, one object per stored KEK version record. */
import type { KekRef } from '../worker-abi/index.js';
import type { KekRecord, Registry } from './registry/index.js';

export class KekRefs {
  readonly #refs = new Map<number, { record: KekRecord; ref: KekRef }>();

  constructor(private readonly registry: Registry) {}

  /** KEK `version` as the registry holds it now, or undefined when it holds none. */
  get(version: number): KekRef | undefined {
    const record = this.registry.kek(version);
    if (record === undefined) return undefined;
    let cached = this.#refs.get(version);
    // Made again for a new record: a re-key changes a version's wrapped bytes.
    if (cached?.record !== record) {
      const ref = { kekId: record.kekId, version: record.version, wrapped: new Uint8Array(record.wrapped) };
      cached = { record, ref };
      this.#refs.set(version, cached);
    }
    return cached.ref;
  }
}
