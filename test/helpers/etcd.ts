/**
 * Real etcd members for tests: the launcher lives beside the benchmarks, which start the same
 * clusters, in bench/etcd.ts (benchmarks import nothing from test/).
 */
export * from '../../bench/etcd.js';
