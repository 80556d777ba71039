import * as tf from '@tensorflow/tfjs-core';
import { runFlatWgsl, runWgsl, wgslFlatIndex } from '@kvpack/core';
import { windowLogitsWgsl } from './logits-wgsl.js';

// SnapKV's scores on webgpu as four WGSL kernels (the same math as snapkvVotes + pool1d, see there):
// the window's logits Q·Kᵀ for every KV head's GQA group at once, read from the cache layouts
// (logits-wgsl.ts), then per logit row the causal softmax's max and normalizer in one pass, then per
// prefix token the votes (softmax weights summed over the window, averaged over the group), then the
// pooling with the window's tokens at +∞ — no host round trip and no [w, T] mask tensor.

const WG = 256;
const FLAT = wgslFlatIndex('flat');

/**
 * Per logit row r = (h·g + q)·w + i (KV head h, query head q of its group, window query i) of
 * logits [H_kv, g·w, T] (unscaled): the max m_r and normalizer s_r of softmax(logits·scale) over the
 * keys query i sees (j ≤ T − w + i), float32 [H_kv·g·w, 2]. One workgroup per row, one pass over it:
 * each invocation keeps a running (max, normalizer) pair, rescaled when the max grows, and the pairs
 * are merged in a tree.
 */
function softmaxRowStats(logits: tf.Tensor3D, w: number, scale: number): tf.Tensor2D {
  const [Hkv, gw] = logits.shape;
  const rows = Hkv * gw;
  return runWgsl({
    key: `snapkv_row_stats_online_${w}_${scale}`,
    names: ['L'],
    inputs: [logits],
    outputShape: [rows, 2],
    dtype: 'float32',
    workgroupSize: WG,
    dispatch: [rows, 1, 1],
    workgroupBytes: 8 * WG,
    code: `const W: u32 = ${w}u;
const SCALE: f32 = ${scale};
var<workgroup> red: array<vec2<f32>, ${WG}>;
// (max, normalizer) of two parts: the normalizers rescaled to the larger max. An empty part is
// (−3e38, 0), whose term vanishes.
fn merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
  let m = max(a.x, b.x);
  return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}
fn kernel(index: i32) {
  let r = workgroupId.x;
  let lid = localIndex;
  let T = u32(uniforms.lShape[2]);
  let visible = T - W + r % W + 1u; // keys 0 … T − w + i
  let base = r * T;
  var m = -3.0e38;
  var s = 0.0;
  for (var j = lid; j < visible; j += ${WG}u) {
    let x = L[base + j] * SCALE;
    if (x > m) {
      s = s * exp(m - x) + 1.0;
      m = x;
    } else {
      s = s + exp(x - m);
    }
  }
  red[lid] = vec2<f32>(m, s);
  workgroupBarrier();
  for (var off = ${WG / 2}u; off > 0u; off = off >> 1u) {
    if (lid < off) { red[lid] = merge(red[lid], red[lid + off]); }
    workgroupBarrier();
  }
  if (lid == 0u) {
    result[r * 2u] = red[0].x;
    result[r * 2u + 1u] = red[0].y;
  }
}`,
  }) as tf.Tensor2D;
}

/** Votes per workgroup: 64 prefix tokens × 4 groups of logit rows. */
const VOTE_COLS = 64;
const VOTE_GROUPS = WG / VOTE_COLS;

/**
 * Votes [H_kv, T − w]: per prefix token, Σ over the g·w rows of its KV head of softmax weights, ÷ g.
 * A workgroup takes 64 consecutive tokens of one KV head; each of its 4 row groups sums every 4th
 * row (coalesced reads along the tokens, 4× the invocations of one per token, so more reads are in
 * flight), and the 4 partial sums are added in workgroup memory.
 */
function votes(logits: tf.Tensor3D, stats: tf.Tensor2D, g: number, w: number, scale: number): tf.Tensor2D {
  const [Hkv, gw, T] = logits.shape;
  return runWgsl({
    key: `snapkv_votes_${VOTE_GROUPS}x${VOTE_COLS}_${g}_${w}_${scale}`,
    names: ['L', 'st'],
    inputs: [logits, stats],
    outputShape: [Hkv, T - w],
    dtype: 'float32',
    workgroupSize: WG,
    dispatch: [Math.ceil((T - w) / VOTE_COLS), Hkv, 1],
    workgroupBytes: 4 * WG,
    code: `const GW: u32 = ${gw}u;
const SCALE: f32 = ${scale};
var<workgroup> part: array<f32, ${WG}>;
fn kernel(index: i32) {
  let P = u32(uniforms.outShape[1]);
  let T = u32(uniforms.lShape[2]);
  let h = workgroupId.y;
  let lid = localIndex;
  let j = workgroupId.x * ${VOTE_COLS}u + lid % ${VOTE_COLS}u;
  var v = 0.0;
  if (j < P) {
    for (var q = lid / ${VOTE_COLS}u; q < GW; q += ${VOTE_GROUPS}u) {
      let r = h * GW + q;
      v = v + exp(L[r * T + j] * SCALE - st[r * 2u]) / st[r * 2u + 1u];
    }
  }
  part[lid] = v;
  workgroupBarrier();
  if (lid < ${VOTE_COLS}u && j < P) {
    result[h * P + j] = (${Array.from({ length: VOTE_GROUPS }, (_, k) => `part[lid + ${k * VOTE_COLS}u]`).join(' + ')}) / ${g}.0;
  }
}`,
  }) as tf.Tensor2D;
}

/**
 * Pooled votes with the window at +∞: [H_kv, T] from votes [H_kv, T − w]; `avg` sums the `kernel`
 * positions centred on each (zeros past the ends) ÷ kernel, `max` takes their max (ends ignored).
 */
function poolWithWindow(v: tf.Tensor2D, T: number, kernel: number, mode: 'avg' | 'max'): tf.Tensor2D {
  const [Hkv] = v.shape;
  const R = Math.floor(kernel / 2);
  return runFlatWgsl({
    key: `snapkv_pool_${kernel}_${mode}`,
    names: ['V'],
    inputs: [v],
    outputShape: [Hkv, T],
    dtype: 'float32',
    invocations: Hkv * T,
    code: `fn kernel(index: i32) {
  ${FLAT}
  let T = u32(uniforms.outShape[1]);
  if (u32(flat) >= u32(uniforms.outShape[0]) * T) { return; }
  let P = i32(uniforms.vShape[1]);
  let h = u32(flat) / T;
  let j = i32(u32(flat) - h * T);
  if (j >= P) {
    result[flat] = bitcast<f32>(0x7f800000u | (u32(flat) & 0u)); // +∞ (a runtime value: WGSL constants must be finite)
    return;
  }
  var acc = ${mode === 'avg' ? '0.0' : 'bitcast<f32>(0xff800000u | (u32(flat) & 0u))'};
  for (var o = -${R}; o <= ${R}; o++) {
    let p = j + o;
    if (p >= 0 && p < P) { acc = ${mode === 'avg' ? 'acc + V[i32(h) * P + p]' : 'max(acc, V[i32(h) * P + p])'}; }
  }
  result[flat] = ${mode === 'avg' ? `acc / ${kernel}.0` : 'acc'};
}`,
  }) as tf.Tensor2D;
}

/**
 * SnapKV's scores [H_kv, T] on webgpu: pooled votes of the last w of the post-RoPE queries
 * [T_obs, H, d] (T_obs ≥ w) over the post-RoPE keys [T, H_kv, d] for the T − w prefix tokens, +∞ for
 * the w window tokens. Neither input is copied. Transient, owned by the caller.
 * @throws as {@link windowLogitsWgsl}.
 */
export function snapkvScoresWgsl(queries: tf.Tensor3D, w: number, keys: tf.Tensor3D, kernel: number, mode: 'avg' | 'max'): tf.Tensor2D {
  const [, Hq, d] = queries.shape;
  const [T, Hkv] = keys.shape;
  const g = Hq / Hkv;
  const scale = 1 / Math.sqrt(d);
  const logits = windowLogitsWgsl(queries, w, keys); // [H_kv, g·w, T]
  let v: tf.Tensor2D;
  try {
    const stats = softmaxRowStats(logits, w, scale);
    try {
      v = votes(logits, stats, g, w, scale);
    } finally {
      stats.dispose();
    }
  } finally {
    logits.dispose();
  }
  try {
    return poolWithWindow(v, T, kernel, mode);
  } finally {
    v.dispose();
  }
}
