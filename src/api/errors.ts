/**
 * The errors callers see. The catalogue itself stays in src/errors.ts, shared by every layer (the
 * crypto workers report its codes too); this is the library's view of it.
 */
export * from '../errors.js';
