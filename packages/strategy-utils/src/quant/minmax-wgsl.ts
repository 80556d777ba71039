import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, WGSL_HALF_BITS, runFlatWgsl, runPackedHalfWgsl, runWgsl, wgslFlatIndex } from '@kvpack/core';
import { CodesTensor } from './codes-tensor.js';
import { minMaxGroupShape, type MinMaxGrouping } from './minmax-groups.js';

// KIVI's min–max quantization of a block as four WGSL kernels on webgpu, the same arithmetic as the
// tfjs ops of quantizeMinMaxOnBackend (see there for why each step is exact) in one pass per group
// and one per packed word: group statistics (float16 minimum, the scale from a double-float
// quotient, the non-finite flag), the codes decided exactly and packed b bits each, the scale and
// minimum packed as float16, and the flag reduced to one scalar.

const FLAT = wgslFlatIndex('flat');

/**
 * Knuth's TwoSum error and the float16 rounding of a float32 value (exact, as roundToHalfOnDevice).
 * Every intermediate of the exact sums passes through `opq`, an integer add of a zero the compiler
 * cannot know (the top bit of a shape uniform the kernel never compares; an add, as two xors would
 * cancel): shader compilers simplify float expressions they deem inexact ((a + b) − a → b, which
 * zeroes TwoSum's error; Mesa's does), which separate tfjs kernels never could.
 */
const HELPERS = `${WGSL_HALF_BITS}
var<private> opqZero: u32;
fn opq(v: f32) -> f32 { return bitcast<f32>(bitcast<u32>(v) + opqZero); }
fn twoSumErr(a: f32, b: f32, s: f32) -> f32 {
  let bb = opq(opq(s) - a);
  let aa = opq(opq(s) - bb);
  return opq(opq(a - aa) + opq(b - bb));
}
fn roundHalf(v: f32) -> f32 { return unpack2x16float(halfBits(v)).x; }`;

/** WGSL: the element index of member i of group q, and the group of element e. */
function groupIndexing(along: MinMaxGrouping, H: number, d: number, g: number): string {
  const HD = H * d;
  return along === 'tokens'
    ? `fn member(q: u32, i: u32) -> u32 { return ((q / ${HD}u) * ${g}u + i) * ${HD}u + q % ${HD}u; }
fn groupOf(e: u32) -> u32 { return (e / ${HD * g}u) * ${HD}u + e % ${HD}u; }`
    : `fn member(q: u32, i: u32) -> u32 { return q * ${g}u + i; }
fn groupOf(e: u32) -> u32 { return e / ${g}u; }`;
}

/** Per group: (scale, minimum, non-finite flag, 0), float32 [groups, 4], scale and minimum float16 values. */
function groupStats(x: tf.Tensor, groups: number, idx: string, g: number, maxq: number): tf.Tensor2D {
  return runFlatWgsl({
    key: `minmax_stats_${maxq}_${g}_${idx.length}_${hash(idx)}`,
    names: ['x'],
    inputs: [x],
    outputShape: [groups, 4],
    dtype: 'float32',
    invocations: groups,
    code: `${HELPERS}
${idx}
fn finite16(v: f32) -> bool { return abs(v) <= 65504.0 && v == v; }
fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape[0]) { return; }
  opqZero = u32(uniforms.xShape) >> 31u; // 0 (a size), unknown to the compiler: no branch tests it
  let q = u32(flat);
  var lo = x[member(q, 0u)];
  var hi = lo;
  for (var i = 1u; i < ${g}u; i++) {
    let v = x[member(q, i)];
    lo = min(lo, v);
    hi = max(hi, v);
  }
  let mn = roundHalf(lo);
  let negLo = -lo;
  let D = opq(hi + negLo);
  let eD = twoSumErr(hi, negLo, D);
  let rh = opq(D / ${maxq}.0);
  let a = opq(rh * ${maxq === 3 ? '2.0' : '16.0'});
  let b = ${maxq === 3 ? 'rh' : '-rh'};
  let Ph = opq(a + b);
  let Pl = twoSumErr(a, b, Ph);
  let rl = opq(opq(opq(opq(D - Ph) + eD) - Pl) / ${maxq}.0);
  let scale = roundHalf(opq(rh + rl));
  let o = q * 4u;
  result[o] = scale;
  result[o + 1u] = mn;
  result[o + 2u] = select(1.0, 0.0, finite16(scale) && finite16(mn));
  result[o + 3u] = 0.0;
}`,
  }) as tf.Tensor2D;
}

/** The codes of every element, decided exactly, packed 32/b to an int32 word (CodesTensor's layout). */
function packedCodes(x: tf.Tensor, stats: tf.Tensor2D, count: number, idx: string, bits: 2 | 4, maxq: number): tf.Tensor1D {
  const per = 32 / bits;
  const words = Math.max(1, Math.ceil(count / per));
  return runFlatWgsl({
    key: `minmax_codes_${bits}_${idx.length}_${hash(idx)}`,
    names: ['x', 'st'],
    inputs: [x, stats],
    outputShape: [words],
    dtype: 'int32',
    invocations: words,
    code: `${HELPERS}
${idx}
fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape) { return; }
  opqZero = u32(uniforms.stShape[1]) >> 31u; // 0, as above
  let count = u32(uniforms.xShape);
  var word = 0u;
  for (var j = 0u; j < ${per}u; j++) {
    let e = u32(flat) * ${per}u + j;
    if (e < count) {
      let q = groupOf(e);
      let scale = st[q * 4u];
      let mn = st[q * 4u + 1u];
      let xv = x[e];
      let negMn = -mn;
      let Dx = opq(xv + negMn);
      let ex = twoSumErr(xv, negMn, Dx);
      let positive = scale > 0.0;
      let safe = select(1.0, scale, positive);
      let f = floor(clamp(Dx / safe, -1.0, ${maxq + 1}.0));
      // The exact sign of x − mn − (f + ½)·scale decides between f and f + 1 (the even one at a tie).
      let sigma = opq(opq(Dx - opq((f + 0.5) * safe)) + ex);
      let odd = f - floor(f * 0.5) * 2.0;
      let up = select(select(odd, 0.0, sigma < 0.0), 1.0, sigma > 0.0);
      let code = select(0.0, clamp(f + up, 0.0, ${maxq}.0), positive);
      word = word | (u32(code) << (j * ${bits}u));
    }
  }
  result[flat] = bitcast<i32>(word);
}`,
  }) as tf.Tensor1D;
}

/**
 * Column `col` of row statistics [rows, 4] (float32 on webgpu), rounded to float16 and packed two per
 * word in one WGSL dispatch, as a float16 tensor of `shape` (product = rows). Disposes no input.
 */
export function packStatsColumn(stats: tf.Tensor2D, col: number, shape: number[]): HalfTensor {
  return runPackedHalfWgsl({
    key: `minmax_pack_column_${col}`,
    names: ['st'],
    inputs: [stats],
    shape,
    value: 'column',
    size: 'u32(uniforms.stShape[0])',
    code: `fn column(r: u32) -> f32 { return st[r * 4u + ${col}u]; }`,
  });
}

/**
 * The max of the flags (column 2) as a float32 scalar: up to 512 workgroups each reduce a strided
 * share of the rows (a single workgroup over ~10⁶ rows is latency-bound: milliseconds on a GPU), then
 * one max over the workgroups' results.
 */
function anyFlag(stats: tf.Tensor2D): tf.Scalar {
  const WG = 256;
  const groups = Math.max(1, Math.min(512, Math.ceil(stats.shape[0] / WG)));
  const out = runWgsl({
    key: 'minmax_any_flag_grid',
    names: ['st'],
    inputs: [stats],
    outputShape: [groups],
    dtype: 'float32',
    workgroupSize: WG,
    dispatch: [groups, 1, 1],
    workgroupBytes: 4 * WG,
    code: `var<workgroup> red: array<f32, ${WG}>;
fn kernel(index: i32) {
  let lid = localIndex;
  let n = u32(uniforms.stShape[0]);
  let stride = numWorkgroups.x * ${WG}u;
  var m = 0.0;
  for (var q = workgroupId.x * ${WG}u + lid; q < n; q += stride) { m = max(m, st[q * 4u + 2u]); }
  red[lid] = m;
  workgroupBarrier();
  for (var off = ${WG / 2}u; off > 0u; off = off >> 1u) {
    if (lid < off) { red[lid] = max(red[lid], red[lid + off]); }
    workgroupBarrier();
  }
  if (lid == 0u) { result[workgroupId.x] = red[0]; }
}`,
  });
  const s = tf.max(out) as tf.Scalar;
  out.dispose();
  return s;
}

/** A short stable hash of a string (kernel keys: the indexing code bakes in H, d, g). */
function hash(s: string): string {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
  return (h >>> 0).toString(36);
}

/**
 * `holdMinMaxOnBackend` on webgpu in four fused kernels (plus two reductions for the flag): the same
 * codes, float16 scale and minimum bit for bit. Does not dispose `x` (float32, n·H·d values).
 */
export function holdMinMaxWgsl(
  block: { along: MinMaxGrouping; n: number; H: number; d: number; g: number; bits: 2 | 4 },
  x: tf.Tensor,
): { tokens: number; codes: CodesTensor; scale: HalfTensor; min: HalfTensor; nonFinite: tf.Scalar } {
  const { along, n, H, d, g, bits } = block;
  const maxq = 2 ** bits - 1;
  const groupShape = minMaxGroupShape(along, n, H, d, g);
  const groups = groupShape[0] * groupShape[1] * groupShape[2];
  const idx = groupIndexing(along, H, d, g);
  const flat = tf.reshape(x, [n * H * d]);
  const made: { dispose(): void }[] = [];
  let stats: tf.Tensor2D | null = null;
  try {
    stats = groupStats(flat, groups, idx, g, maxq);
    const codes = CodesTensor.fromPacked(packedCodes(flat, stats, n * H * d, idx, bits, maxq), bits, n * H * d);
    made.push(codes);
    const scale = packStatsColumn(stats, 0, groupShape);
    made.push(scale);
    const min = packStatsColumn(stats, 1, groupShape);
    made.push(min);
    const nonFinite = anyFlag(stats);
    return { tokens: n, codes, scale, min, nonFinite };
  } catch (e) {
    made.forEach((t) => t.dispose());
    throw e;
  } finally {
    flat.dispose();
    stats?.dispose();
  }
}
