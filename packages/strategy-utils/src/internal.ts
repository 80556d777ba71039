// Internal entry: kernels and switches for kvpack's own tests, benchmarks and GPU scripts. Not part
// of the public API; it may change in any release.
export * from './lowrank/sparse-wgsl.js';
