// Internal entry: kernels and switches for kvpack's own tests, benchmarks and GPU scripts. Not part
// of the public API; it may change in any release.

// Attention of a grouped low-rank cache with forced paths, and the sparse chunk selection.
export { attendWith, sparseSelection, type AttendSwitches } from './lowrank/attend-with.js';
export type { SparseSwitches } from './lowrank/sparse-attend.js';
export { valuePathFlops, type ValuePath } from './lowrank/attend-full.js';
// The sparse index build (`where` forces the host float64 or the device build) and its geometry.
export { buildSparseIndex } from './lowrank/sparse-index-build.js';
export { sparseGeometry } from './lowrank/sparse-index.js';
// Timing hook of the perf suite.
export { decodeStepTimes, type DecodeStepTimes } from './lowrank/decode-timing.js';
// WGSL kernels of the sparse step (webgpu).
export * from './lowrank/sparse-wgsl.js';
