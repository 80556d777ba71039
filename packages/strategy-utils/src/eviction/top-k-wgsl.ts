import * as tf from '@tensorflow/tfjs-core';
import { check, runWgsl } from '@kvpack/core';

/** Invocations per workgroup of the top-k kernel (one workgroup per row). */
const WG = 256;

/**
 * Where the top-k kernel reads its scores: WGSL defining `fn score(row: u32, i: u32) -> f32` (the
 * score of position i of row) and `fn rowLength() -> u32` (T, best read from an input's shape uniform
 * so that one compiled pipeline serves every T), over the named inputs. Lets a caller fuse the last step of its scoring
 * (pooling, a window kept at +∞) into the selection instead of writing the scores first.
 */
export interface WgslScoreSource {
  /** Unique name of the source's code, every baked-in constant included. */
  key: string;
  names: string[];
  inputs: tf.Tensor[];
  code: string;
}

/** Scores read straight from a float32 [R, T] tensor. */
export function plainScores(scores: tf.Tensor): WgslScoreSource {
  return {
    key: 'plain',
    names: ['S'],
    inputs: [scores],
    code: `fn rowLength() -> u32 { return u32(uniforms.sShape[1]); }
fn score(row: u32, i: u32) -> f32 { return S[row * u32(uniforms.sShape[1]) + i]; }`,
  };
}

/**
 * Per row, the positions of the `k` highest scores of `src` (R rows of T), ties to the lower position, a
 * NaN ranking lowest (as −∞), −0 equal to +0, ascending — the rule of `topKPositions` and the host
 * `keepTopScores` — in **one** WGSL dispatch on webgpu, one workgroup per row: a radix select of the
 * k-th largest score over order-preserving 32-bit keys (four 8-bit histogram passes), then one
 * compaction pass (a workgroup scan of the counts above and tied with it), so the selection makes no
 * host round trip and does not sort. Returns int32 [R, k], transient, owned by the caller.
 * @throws KvpackError('shape') when k is not in 1 … T − 1 or R is not in 1 … 65,535.
 */
export function topKPositionsWgsl(src: WgslScoreSource, R: number, T: number, k: number): tf.Tensor2D {
  check(Number.isInteger(k) && k >= 1 && k < T, 'shape', `top-k kernel: k = ${k} must be in 1 … T − 1 = ${T - 1}`);
  check(Number.isInteger(R) && R >= 1 && R <= 65535, 'shape', `top-k kernel: ${R} rows must be in 1 … 65,535`);
  const code = `
const WG: u32 = ${WG}u;
var<workgroup> tk_hist: array<atomic<u32>, 256>;
var<workgroup> tk_scan: array<u32, ${WG}>;
var<workgroup> tk_sel: array<u32, 2>;
${src.code}
// Order-preserving key: larger score, larger key; NaN as −∞, −0 as +0.
fn tk_key(v: f32) -> u32 {
  let b = bitcast<u32>(v);
  let a = b & 0x7fffffffu;
  if (a > 0x7f800000u) { return 0x007fffffu; }
  if (a == 0u) { return 0x80000000u; }
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}
fn kernel(index: i32) {
  let row = workgroupId.x;
  let lid = localIndex;
  let T = rowLength();
  let K = u32(uniforms.outShape[1]);
  // Radix select of the K-th largest key, 8 bits a pass from the top; remaining = how many of the
  // K are still to be found among the keys that share the prefix chosen so far.
  var prefix = 0u;
  var remaining = K;
  for (var pw = 0u; pw < 4u; pw++) {
    let shift = 24u - 8u * pw;
    let hiMask = ~(0xffffffffu >> (8u * pw));
    atomicStore(&tk_hist[lid], 0u);
    workgroupBarrier();
    for (var i = lid; i < T; i += WG) {
      let key = tk_key(score(row, i));
      if ((key & hiMask) == prefix) { atomicAdd(&tk_hist[(key >> shift) & 255u], 1u); }
    }
    workgroupBarrier();
    if (lid == 0u) {
      var acc = 0u;
      var b = 255u;
      loop {
        let c = atomicLoad(&tk_hist[b]);
        if (acc + c >= remaining || b == 0u) { break; }
        acc += c;
        b -= 1u;
      }
      tk_sel[0] = prefix | (b << shift);
      tk_sel[1] = remaining - acc;
    }
    workgroupBarrier();
    prefix = tk_sel[0];
    remaining = tk_sel[1];
    workgroupBarrier();
  }
  // prefix is the K-th largest key; the K − remaining keys above it are kept, and of the keys equal
  // to it the first \`remaining\` by position. One pass in position order: a workgroup scan of
  // (above, tied) counts packed in 16 bits each gives every kept position its output slot.
  let need = remaining;
  var above = 0u;
  var tied = 0u;
  for (var base = 0u; base < T; base += WG) {
    let i = base + lid;
    var key = 0u;
    var mine = 0u;
    if (i < T) {
      key = tk_key(score(row, i));
      mine = select(0u, 1u, key > prefix) | select(0u, 0x10000u, key == prefix);
    }
    tk_scan[lid] = mine;
    workgroupBarrier();
    for (var off = 1u; off < WG; off = off << 1u) {
      var v = tk_scan[lid];
      if (lid >= off) { v += tk_scan[lid - off]; }
      workgroupBarrier();
      tk_scan[lid] = v;
      workgroupBarrier();
    }
    let before = tk_scan[lid] - mine; // exclusive counts in this block
    let aboveBefore = above + (before & 0xffffu);
    let tiedBefore = tied + (before >> 16u);
    if (i < T && key > prefix) {
      result[row * K + aboveBefore + min(tiedBefore, need)] = i32(i);
    } else if (i < T && key == prefix && tiedBefore < need) {
      result[row * K + aboveBefore + tiedBefore] = i32(i);
    }
    let total = tk_scan[WG - 1u];
    above += total & 0xffffu;
    tied += total >> 16u;
    workgroupBarrier();
  }
}`;
  return runWgsl({
    key: `topk_positions_${src.key}`,
    names: src.names,
    inputs: src.inputs,
    outputShape: [R, k],
    dtype: 'int32',
    workgroupSize: WG,
    dispatch: [R, 1, 1],
    workgroupBytes: 4 * (256 + WG + 2),
    code,
  }) as tf.Tensor2D;
}
