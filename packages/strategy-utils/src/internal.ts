/**
 * Internal entry (`@kvpack/strategy-utils/internal`): tuning switches, kernels and hooks for kvpack's
 * own tests, benchmarks and GPU scripts. Not part of the public API; it may change in any release.
 * @module internal
 * @internal
 */
// Internal entry: tuning switches, kernels and hooks for kvpack's own tests, benchmarks and GPU
// scripts. Not part of the public API; it may change in any release.

// Attention of a grouped low-rank cache with forced paths (mode, values, gather, heads, kernels,
// budget), and the chunks sparse attention selects.
export { attendWith, hasAttendSwitches, sparseSelection, type AttendSwitches } from './lowrank/attend-with.js';
// Multiply–accumulate counts behind the full-mode value path.
export { valuePathFlops } from './lowrank/attend-full.js';
// The sparse index build (`where` forces the host float64 or the device build) and its geometry.
export { buildSparseIndex } from './lowrank/sparse-index-build.js';
export { sparseGeometry } from './lowrank/sparse-index.js';
// Timing hook of the perf suite.
export { decodeStepTimes } from './lowrank/decode-timing.js';
// The WGSL chunk selection of the sparse step (webgpu), tested on its own.
export { keyRowsFits, keyRowsWgsl, selectChunkTokens } from './lowrank/sparse-wgsl.js';
// The tiled WGSL GEMM of the range finder (webgpu), its tiles and the switch back to tf.matMul.
export { GEMM_TILES, defaultSplitK, rangeFinderMatmul, setRangeFinderProducts, wgslMatmul, type GemmTile, type WgslMatmulOptions } from './lowrank/tall-skinny-wgsl.js';
