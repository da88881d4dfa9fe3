/**
 * Child-process plumbing for tests: the benchmarks start the same daemons and servers, so the
 * helpers live beside them in bench/processes.ts (benchmarks import nothing from test/).
 */
export { cleanEnv, freePort, until } from '../../bench/processes.js';
