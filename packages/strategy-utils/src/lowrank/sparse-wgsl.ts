import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check, runWgsl } from '@kvpack/core';

/*
 * WGSL kernels of one sparse decode step (xKV-SR, see sparse-index.ts and sparse-attend.ts) on the webgpu backend, for one query
 * token. tfjs-webgpu runs the batched tfjs formulation as ~35 kernels plus a ~72-dispatch bitonic
 * top-k, and a decode step of one layer is launch-bound there. These six kernels, with tfjs's query
 * scale and the exact rows' unpacking, do the same step; the factors are read packed in place:
 *
 *   selectChunks    chunk logits q·landmark, softmax per query row, max over the GQA group, top-k by
 *                   a radix select — one workgroup per KV head — and the selected chunks' token ids
 *   keyRows         U_k[tokens]·B_k[:, h] → pre-RoPE keys [H_kv, S, d], a tiled product that reads the
 *                   selected basis rows and the factor in place (nothing gathered or unpacked first)
 *   ropeScores      RoPE at each token's position applied in registers, scores against the queries
 *   softmaxExact    the exact (outlier, local, residual) keys' scores and one softmax over all
 *   valuePartials   p·U_v[tokens] in SPLIT partial sums, never gathering U_v
 *   valueCombine    (Σ partials)·B_v[:, h] + p_exact·V_exact (B_v read in place)
 *
 * Shapes: H = H_kv, G = query rows per KV head (g query heads × 1 token), d = head_dim, C = landmark
 * chunks, c = chunk size, S = k·c selected tokens, R_v = value rank, E = exact rows per head.
 */

const WG = 256;

/** Workgroup-memory bytes of each kernel of the step (G query rows per KV head, head_dim d, value rank R_v). */
function workgroupBytes(G: number, d: number, Rv: number) {
  return {
    select: 4 * (G * d + WG + 2 * WG + 2 + 1),
    ropeScores: 4 * G * d,
    softmaxExact: 4 * (d + WG),
    valuePartials: 4 * (G * WG + WG),
    valueCombine: 4 * Rv,
  };
}

/**
 * Whether the WGSL step can run for these shapes: every kernel's workgroup arrays within `limit` bytes
 * (the device's maxComputeWorkgroupStorageSize) and the chunk selection's per-invocation arrays (⌈C/256⌉
 * keys and ⌈C/256⌉·G logits) within WGSL's 8 KiB for a function-scope variable.
 */
export function wgslStepFits(G: number, d: number, Rv: number, C: number, limit: number): boolean {
  const cpt = Math.ceil(C / WG);
  return Math.max(...Object.values(workgroupBytes(G, d, Rv))) <= limit && cpt * G <= 2048;
}

/**
 * An input read either as float32 or as its packed float16 form ({@link HalfTensor}: value f in half
 * f & 1 of word f / 2, read with `unpack2x16float`): the binding, and a WGSL function `fn(f: u32) -> f32`
 * named `read` returning value f of the logical (row-major) array.
 */
function floatInput(x: tf.Tensor | HalfTensor, name: string, read: string): { tensor: tf.Tensor; code: string } {
  if (x instanceof HalfTensor) {
    return {
      tensor: x.packed,
      code: `fn ${read}(f: u32) -> f32 {
  let pair = unpack2x16float(bitcast<u32>(${name}[f >> 1u]));
  return select(pair.x, pair.y, (f & 1u) == 1u);
}`,
    };
  }
  return { tensor: x, code: `fn ${read}(f: u32) -> f32 { return ${name}[f]; }` };
}

/** Selected rows per workgroup of {@link keyRowsWgsl} (8 per invocation row group). */
const KEY_ROWS = 64;
/** Rank columns per step of {@link keyRowsWgsl}'s slab loop. */
const KEY_SLAB = 16;

/**
 * Pre-RoPE keys of the selected tokens, [H, S, d]: y[h, s, :] = U_k[tokens[h, s], :]·B_k[:, h·d : (h+1)·d],
 * with U_k [T, R_k] and B_k [R_k, H·d] each float32 or float16 packed (read in place: no gathered or
 * unpacked copy). A tiled product: a workgroup computes 64 selected rows × d for one KV head, 16 rank
 * columns at a time through workgroup memory (at most 12.5 KiB); each invocation owns 8 rows × ⌈d/32⌉
 * columns. Needs d ≤ 128 ({@link keyRowsFits}).
 */
export function keyRowsWgsl(tokens: tf.Tensor2D, uk: tf.Tensor2D | HalfTensor, bk: tf.Tensor2D | HalfTensor, d: number): tf.Tensor3D {
  const [H, S] = tokens.shape;
  const Rk = uk.shape[1];
  check(keyRowsFits(d) && uk.shape.length === 2 && bk.shape.length === 2 && bk.shape[0] === Rk && bk.shape[1] === H * d, 'shape', `keyRowsWgsl: U_k [${uk.shape}], B_k [${bk.shape}] do not match tokens [${tokens.shape}] and head_dim ${d} (at most 128)`);
  const ukIn = floatInput(uk, 'Uk', 'uk_at');
  const bkIn = floatInput(bk, 'Bk', 'bk_at');
  const cj = Math.ceil(d / 32);
  const code = `
const S: u32 = ${S}u;
const D: u32 = ${d}u;
const RK: u32 = ${Rk}u;
const HD: u32 = ${H * d}u;
const ROWS: u32 = ${KEY_ROWS}u;
const SLAB: u32 = ${KEY_SLAB}u;
const CJ: u32 = ${cj}u;
var<workgroup> us: array<f32, ${KEY_ROWS * (KEY_SLAB + 1)}>;
var<workgroup> bs: array<f32, ${KEY_SLAB * d}>;
${ukIn.code}
${bkIn.code}
fn kernel(index: i32) {
  let lid = localIndex;
  let tx = lid % 32u;
  let ty = lid / 32u;
  let s0 = workgroupId.x * ROWS;
  let h = workgroupId.y;
  var acc: array<f32, ${8 * cj}>;
  // A constant trip count: barriers need uniform control flow, and workgroupId is a private variable here.
  for (var r0 = 0u; r0 < RK; r0 += SLAB) {
    for (var e = lid; e < ROWS * SLAB; e += ${WG}u) {
      let row = e / SLAB;
      let c = e % SLAB;
      var v = 0.0;
      if (s0 + row < S && r0 + c < RK) { v = uk_at(u32(Tok[h * S + s0 + row]) * RK + r0 + c); }
      us[row * (SLAB + 1u) + c] = v;
    }
    for (var e = lid; e < SLAB * D; e += ${WG}u) {
      let rr = e / D;
      let c = e % D;
      var v = 0.0;
      if (r0 + rr < RK) { v = bk_at((r0 + rr) * HD + h * D + c); }
      bs[e] = v;
    }
    workgroupBarrier();
    for (var rr = 0u; rr < SLAB; rr++) {
      for (var i = 0u; i < 8u; i++) {
        let u = us[(ty + 8u * i) * (SLAB + 1u) + rr];
        for (var j = 0u; j < CJ; j++) {
          let c = min(tx + 32u * j, D - 1u);
          acc[i * CJ + j] = acc[i * CJ + j] + u * bs[rr * D + c];
        }
      }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < 8u; i++) {
    let s = s0 + ty + 8u * i;
    if (s < S) {
      for (var j = 0u; j < CJ; j++) {
        if (tx + 32u * j < D) { result[(h * S + s) * D + tx + 32u * j] = acc[i * CJ + j]; }
      }
    }
  }
}`;
  return runWgsl({
    key: `keyrows_${S}_${d}_${Rk}_${H}_${uk instanceof HalfTensor ? 'h' : 'f'}${bk instanceof HalfTensor ? 'h' : 'f'}`,
    names: ['Tok', 'Uk', 'Bk'],
    inputs: [tokens, ukIn.tensor, bkIn.tensor],
    outputShape: [H, S, d],
    dtype: 'float32',
    workgroupSize: WG,
    dispatch: [Math.ceil(S / KEY_ROWS), H, 1],
    workgroupBytes: 4 * (KEY_ROWS * (KEY_SLAB + 1) + KEY_SLAB * d),
    code,
  }) as tf.Tensor3D;
}

/** Whether {@link keyRowsWgsl} handles head_dim d. */
export function keyRowsFits(d: number): boolean {
  return Number.isInteger(d) && d >= 1 && d <= 128;
}

/** A float32 constant as WGSL source (the value of Math.fround(x), exactly); x finite, |x| < 1e21. */
function f32(x: number): string {
  const v = Math.fround(x);
  check(Number.isFinite(v) && Math.abs(v) < 1e21, 'config', `a WGSL constant must be a finite float32 below 1e21 in size, got ${x}`);
  return Number.isInteger(v) ? `${v}.0` : `${v}`;
}

/** Partial sums of p·U_v[tokens] per KV head (more workgroups in flight than H_kv·⌈R_v/256⌉). */
const SPLIT = 8;

const reductions = `
var<workgroup> kv_red: array<f32, ${WG}>;
fn kv_reduce_max(v: f32, lid: u32) -> f32 {
  kv_red[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { kv_red[lid] = max(kv_red[lid], kv_red[lid + s]); }
    workgroupBarrier();
  }
  let out = kv_red[0];
  workgroupBarrier();
  return out;
}
fn kv_reduce_sum(v: f32, lid: u32) -> f32 {
  kv_red[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { kv_red[lid] = kv_red[lid] + kv_red[lid + s]; }
    workgroupBarrier();
  }
  let out = kv_red[0];
  workgroupBarrier();
  return out;
}`;

/**
 * Selected chunks' token ids per KV head, [H, k·c] int32 (chunks in ascending order, each chunk's c
 * tokens in order; ties at the k-th score go to the lowest chunk indices, as with tf.topk). Scores as
 * `SparseDecoder.chunkScores`: softmax over chunks of each query row's q·landmark (outlier chunks
 * masked out), the maximum over the G rows, outlier chunks never selected.
 * @param q queries [H, G, d], multiplied by `scale` as they are read (1/√d: the attention scale);
 *   lt landmarks [H, d, C], float32 or float16 packed (read in place); outliers int32 [H, O], each
 *   head's outlier chunk indices (their logits get −1e30), or null.
 */
export function selectChunkTokens(q: tf.Tensor3D, lt: tf.Tensor3D | HalfTensor, outliers: tf.Tensor2D | null, k: number, c: number, scale = 1): tf.Tensor2D {
  const [H, G, d] = q.shape;
  const C = lt.shape[2];
  check(lt.shape.length === 3 && lt.shape[0] === H && lt.shape[1] === d, 'shape', `selectChunkTokens: landmarks [${lt.shape}] do not match queries [${q.shape}]`);
  const ltIn = floatInput(lt, 'Lt', 'lt_at');
  check(Number.isInteger(k) && k >= 1 && k <= C, 'rank', `selectChunkTokens: k = ${k} chunks must be in 1 … ${C}`);
  const cpt = Math.ceil(C / WG);
  const code = `
const G: u32 = ${G}u;
const D: u32 = ${d}u;
const C: u32 = ${C}u;
const CPT: u32 = ${cpt}u;
const K: u32 = ${k}u;
const CS: u32 = ${c}u;
var<workgroup> qs: array<f32, ${G * d}>;
var<workgroup> kv_count: atomic<u32>;
var<workgroup> kv_offs: array<u32, ${2 * WG + 2}>;
${reductions}
${ltIn.code}
fn kv_outlier(h: u32, ch: u32) -> bool {
${
  outliers
    ? `  let n = u32(uniforms.ocShape.y);
  for (var o = 0u; o < n; o++) { if (u32(Oc[h * n + o]) == ch) { return true; } }`
    : ''
}
  return false;
}
fn kv_logits(h: u32, ch: u32) -> array<f32, ${G}> {
  var a: array<f32, ${G}>;
  for (var r = 0u; r < G; r++) { a[r] = 0.0; }
  for (var e = 0u; e < D; e++) {
    let l = lt_at((h * D + e) * C + ch);
    for (var r = 0u; r < G; r++) { a[r] = a[r] + qs[r * D + e] * l; }
  }
  let m = select(0.0, -1e30, kv_outlier(h, ch));
  for (var r = 0u; r < G; r++) { a[r] = a[r] + m; }
  return a;
}
// Order-preserving map of f32 to u32 (larger float, larger key).
fn kv_ord(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}
fn kernel(index: i32) {
  let h = workgroupId.x;
  let lid = localIndex;
  for (var i = lid; i < G * D; i += ${WG}u) { qs[i] = Q[h * G * D + i] * ${f32(scale)}; }
  workgroupBarrier();
  // Invocation lid owns chunks lid·CPT … lid·CPT + CPT − 1 (so its compaction order is chunk order and
  // ties at the k-th score go to the lowest chunks, as tf.topk); their logits stay in registers
  // (CPT·G values) across the three passes.
  var lg: array<f32, ${cpt * G}>;
  var mx: array<f32, ${G}>;
  var z: array<f32, ${G}>;
  for (var r = 0u; r < G; r++) { mx[r] = -3.0e38; z[r] = 0.0; }
  for (var i = 0u; i < CPT; i++) {
    let ch = lid * CPT + i;
    if (ch < C) {
      let a = kv_logits(h, ch);
      for (var r = 0u; r < G; r++) {
        lg[i * G + r] = a[r];
        mx[r] = max(mx[r], a[r]);
      }
    }
  }
  for (var r = 0u; r < G; r++) { mx[r] = kv_reduce_max(mx[r], lid); }
  for (var i = 0u; i < CPT; i++) {
    if (lid * CPT + i < C) {
      for (var r = 0u; r < G; r++) { z[r] = z[r] + exp(lg[i * G + r] - mx[r]); }
    }
  }
  for (var r = 0u; r < G; r++) { z[r] = kv_reduce_sum(z[r], lid); }
  var keys: array<u32, ${cpt}>;
  for (var i = 0u; i < CPT; i++) {
    let ch = lid * CPT + i;
    keys[i] = 0u;
    if (ch < C) {
      var s = 0.0;
      for (var r = 0u; r < G; r++) { s = max(s, exp(lg[i * G + r] - mx[r]) / z[r]); }
      keys[i] = kv_ord(s + select(0.0, -1e30, kv_outlier(h, ch)));
    }
  }
  // Radix select of the K-th largest key, most significant bit first.
  var prefix = 0u;
  for (var bit = 31i; bit >= 0i; bit--) {
    let cand = prefix | (1u << u32(bit));
    var n = 0u;
    for (var i = 0u; i < CPT; i++) {
      if (lid * CPT + i < C && keys[i] >= cand) { n++; }
    }
    if (lid == 0u) { atomicStore(&kv_count, 0u); }
    workgroupBarrier();
    atomicAdd(&kv_count, n);
    workgroupBarrier();
    let total = atomicLoad(&kv_count);
    workgroupBarrier();
    if (total >= K) { prefix = cand; }
  }
  // Compaction: every key above the threshold, then ties in (thread, slot) order up to K.
  var ngt = 0u;
  var neq = 0u;
  for (var i = 0u; i < CPT; i++) {
    if (lid * CPT + i < C) {
      if (keys[i] > prefix) { ngt++; } else if (keys[i] == prefix) { neq++; }
    }
  }
  kv_offs[lid] = ngt;
  kv_offs[${WG}u + lid] = neq;
  workgroupBarrier();
  if (lid == 0u) {
    var sg = 0u;
    var se = 0u;
    for (var t = 0u; t < ${WG}u; t++) {
      let a = kv_offs[t];
      kv_offs[t] = sg;
      sg += a;
      let b = kv_offs[${WG}u + t];
      kv_offs[${WG}u + t] = se;
      se += b;
    }
    kv_offs[${2 * WG}u] = sg;
  }
  workgroupBarrier();
  let gt = kv_offs[${2 * WG}u];
  var pg = kv_offs[lid];
  var pe = kv_offs[${WG}u + lid];
  for (var i = 0u; i < CPT; i++) {
    let ch = lid * CPT + i;
    if (ch < C) {
      var slot = K;
      if (keys[i] > prefix) { slot = pg; pg++; }
      else if (keys[i] == prefix) { if (gt + pe < K) { slot = gt + pe; } pe++; }
      if (slot < K) {
        for (var u = 0u; u < CS; u++) { result[(h * K + slot) * CS + u] = i32(ch * CS + u); }
      }
    }
  }
}`;
  check(!outliers || (outliers.dtype === 'int32' && outliers.rank === 2 && outliers.shape[0] === H), 'shape', () => `selectChunkTokens: outlier chunks must be int32 [${H}, O], got ${outliers!.dtype} [${outliers!.shape}]`);
  const names = outliers ? ['Q', 'Lt', 'Oc'] : ['Q', 'Lt'];
  const inputs = outliers ? [q, ltIn.tensor, outliers] : [q, ltIn.tensor];
  return runWgsl({
    key: `select_${G}_${d}_${C}_${k}_${c}_${outliers ? 1 : 0}_${lt instanceof HalfTensor ? 'h' : 'f'}_${f32(scale)}`,
    names,
    inputs,
    outputShape: [H, k * c],
    dtype: 'int32',
    workgroupSize: WG,
    dispatch: [H, 1, 1],
    workgroupBytes: workgroupBytes(G, d, 0).select,
    code,
  }) as tf.Tensor2D;
}

/**
 * Scores of the selected tokens, [H, G, S]: q · RoPE(y) with y the pre-RoPE key rows [H, S, d] and
 * RoPE at each row's token (cos/sin tables [T, d], full width as `fullWidthRopeTables`; pairs
 * (2i, 2i+1) when `interleaved`, else (i, i + d/2)).
 */
export function ropeScoresWgsl(q: tf.Tensor3D, y: tf.Tensor3D, tokens: tf.Tensor2D, cos: tf.Tensor2D, sin: tf.Tensor2D, interleaved: boolean, scale = 1): tf.Tensor3D {
  const [H, G, d] = q.shape;
  const S = y.shape[1];
  check(y.shape[0] === H && y.shape[2] === d && tokens.shape[0] === H && tokens.shape[1] === S, 'shape', `ropeScoresWgsl: keys [${y.shape}] / tokens [${tokens.shape}] do not match queries [${q.shape}]`);
  const wg = 64;
  const code = `
const G: u32 = ${G}u;
const D: u32 = ${d}u;
const S: u32 = ${S}u;
var<workgroup> qs: array<f32, ${G * d}>;
fn kernel(index: i32) {
  let h = workgroupId.y;
  let lid = localIndex;
  for (var i = lid; i < G * D; i += ${wg}u) { qs[i] = Q[h * G * D + i] * ${f32(scale)}; }
  workgroupBarrier();
  let s = workgroupId.x * ${wg}u + lid;
  if (s >= S) { return; }
  let yb = (h * S + s) * D;
  let tb = u32(Tok[h * S + s]) * D;
  var acc: array<f32, ${G}>;
  for (var r = 0u; r < G; r++) { acc[r] = 0.0; }
  for (var i = 0u; i < ${d / 2}u; i++) {
    let ia = ${interleaved ? '2u * i' : 'i'};
    let ib = ${interleaved ? '2u * i + 1u' : `i + ${d / 2}u`};
    let ya = Y[yb + ia];
    let yo = Y[yb + ib];
    let cs = Cos[tb + ia];
    let sn = Sin[tb + ia];
    let ka = ya * cs - yo * sn;
    let kb = yo * cs + ya * sn;
    for (var r = 0u; r < G; r++) { acc[r] = acc[r] + qs[r * D + ia] * ka + qs[r * D + ib] * kb; }
  }
  for (var r = 0u; r < G; r++) { result[(h * G + r) * S + s] = acc[r]; }
}`;
  return runWgsl({
    key: `ropescore_${G}_${d}_${S}_${interleaved ? 1 : 0}_${f32(scale)}`,
    names: ['Q', 'Y', 'Tok', 'Cos', 'Sin'],
    inputs: [q, y, tokens, cos, sin],
    outputShape: [H, G, S],
    dtype: 'float32',
    workgroupSize: wg,
    dispatch: [Math.ceil(S / wg), H, 1],
    workgroupBytes: workgroupBytes(G, d, 0).ropeScores,
    code,
  }) as tf.Tensor3D;
}

/**
 * Attention probabilities [H, G, S + E]: the selected tokens' scores ss [H, G, S] next to the exact
 * rows' scores q·kx (kx [H, E, d], post-RoPE), one softmax per row.
 */
export function softmaxExactWgsl(ss: tf.Tensor3D, q: tf.Tensor3D, kx: tf.Tensor3D, scale = 1): tf.Tensor3D {
  const [H, G, d] = q.shape;
  const S = ss.shape[2];
  const E = kx.shape[1];
  check(kx.shape[0] === H && kx.shape[2] === d && E > 0, 'shape', `softmaxExactWgsl: exact keys [${kx.shape}] do not match queries [${q.shape}]`);
  const code = `
const G: u32 = ${G}u;
const D: u32 = ${d}u;
const S: u32 = ${S}u;
var<workgroup> qs: array<f32, ${d}>;
${reductions}
fn kernel(index: i32) {
  let r = workgroupId.x;
  let h = workgroupId.y;
  let lid = localIndex;
  let E = u32(uniforms.kxShape.y);
  let W = S + E;
  for (var i = lid; i < D; i += ${WG}u) { qs[i] = Q[(h * G + r) * D + i] * ${f32(scale)}; }
  workgroupBarrier();
  let ob = (h * G + r) * W;
  var mx = -3.0e38;
  for (var j = lid; j < W; j += ${WG}u) {
    var v = 0.0;
    if (j < S) {
      v = Ss[(h * G + r) * S + j];
    } else {
      let kb = (h * E + (j - S)) * D;
      for (var e = 0u; e < D; e++) { v = v + qs[e] * Kx[kb + e]; }
    }
    result[ob + j] = v;
    mx = max(mx, v);
  }
  let m = kv_reduce_max(mx, lid);
  var z = 0.0;
  for (var j = lid; j < W; j += ${WG}u) {
    let p = exp(result[ob + j] - m);
    result[ob + j] = p;
    z = z + p;
  }
  let inv = 1.0 / kv_reduce_sum(z, lid);
  for (var j = lid; j < W; j += ${WG}u) { result[ob + j] = result[ob + j] * inv; }
}`;
  return runWgsl({
    key: `softmaxexact_${G}_${d}_${S}_${f32(scale)}`,
    names: ['Ss', 'Q', 'Kx'],
    inputs: [ss, q, kx],
    outputShape: [H, G, S + E],
    dtype: 'float32',
    workgroupSize: WG,
    dispatch: [G, H, 1],
    workgroupBytes: workgroupBytes(G, d, 0).softmaxExact,
    code,
  }) as tf.Tensor3D;
}

/**
 * The attention output of one step in the compressed domain for the values, [H, G, d]:
 * (p_S · U_v[tokens]) · B_v[:, h] + p_E · v_exact, with p [H, G, S + E] from {@link softmaxExactWgsl},
 * tokens [H, S], U_v [T, R_v] and the layer factor B_v [R_v, H·d] (each float32, or float16 packed
 * and read in place), exact values vx [H, E, d]. Two kernels:
 * SPLIT partial sums of p_S · U_v[tokens] (read row by row, never gathered), then their sum times B_v
 * plus the exact rows.
 */
export function valuesWgsl(p: tf.Tensor3D, tokens: tf.Tensor2D, uv: tf.Tensor2D | HalfTensor, bv: tf.Tensor2D | HalfTensor, vx: tf.Tensor3D): tf.Tensor3D {
  const [H, G] = p.shape;
  const S = tokens.shape[1];
  const Rv = uv.shape[1];
  const d = vx.shape[2];
  const E = vx.shape[1];
  const uvIn = floatInput(uv, 'Uv', 'uv_at');
  const bvIn = floatInput(bv, 'Bv', 'bv_at');
  check(uv.shape.length === 2 && bv.shape.length === 2 && bv.shape[0] === Rv && bv.shape[1] === H * d && vx.shape[0] === H && p.shape[2] === S + E, 'shape', `valuesWgsl: p [${p.shape}], U_v [${uv.shape}], B_v [${bv.shape}], exact values [${vx.shape}] do not match`);
  const per = Math.ceil(S / SPLIT);
  const partial = `
const G: u32 = ${G}u;
const S: u32 = ${S}u;
const RV: u32 = ${Rv}u;
const PER: u32 = ${per}u;
var<workgroup> ps: array<f32, ${G * WG}>;
var<workgroup> ts: array<u32, ${WG}>;
${uvIn.code}
fn kernel(index: i32) {
  let lid = localIndex;
  let col = workgroupId.x * ${WG}u + lid;
  let sp = workgroupId.y;
  let h = workgroupId.z;
  let W = u32(uniforms.pShape.z);
  let s0 = sp * PER;
  let s1 = min(S, s0 + PER);
  var acc: array<f32, ${G}>;
  for (var r = 0u; r < G; r++) { acc[r] = 0.0; }
  // A constant trip count: barriers need uniform control flow, and workgroupId is a private variable here.
  for (var tile = 0u; tile < ${Math.ceil(per / WG)}u; tile++) {
    let base = s0 + tile * ${WG}u;
    let n = select(0u, min(${WG}u, s1 - base), base < s1);
    if (lid < n) {
      ts[lid] = u32(Tok[h * S + base + lid]);
      for (var r = 0u; r < G; r++) { ps[r * ${WG}u + lid] = P[(h * G + r) * W + base + lid]; }
    }
    workgroupBarrier();
    if (col < RV) {
      for (var u = 0u; u < n; u++) {
        let x = uv_at(ts[u] * RV + col);
        for (var r = 0u; r < G; r++) { acc[r] = acc[r] + ps[r * ${WG}u + u] * x; }
      }
    }
    workgroupBarrier();
  }
  if (col < RV) {
    for (var r = 0u; r < G; r++) { result[((h * ${SPLIT}u + sp) * G + r) * RV + col] = acc[r]; }
  }
}`;
  const parts = runWgsl({
    key: `valuepartials_${G}_${S}_${Rv}_${uv instanceof HalfTensor ? 'h' : 'f'}`,
    names: ['P', 'Tok', 'Uv'],
    inputs: [p, tokens, uvIn.tensor],
    outputShape: [H, SPLIT, G, Rv],
    dtype: 'float32',
    workgroupSize: WG,
    dispatch: [Math.ceil(Rv / WG), SPLIT, H],
    workgroupBytes: workgroupBytes(G, d, Rv).valuePartials,
    code: partial,
  });
  const wg = 128;
  const combine = `
const G: u32 = ${G}u;
const S: u32 = ${S}u;
const RV: u32 = ${Rv}u;
const D: u32 = ${d}u;
const HD: u32 = ${H * d}u;
var<workgroup> ws: array<f32, ${Rv}>;
${bvIn.code}
fn kernel(index: i32) {
  let lid = localIndex;
  let r = workgroupId.x;
  let h = workgroupId.y;
  let E = u32(uniforms.vxShape.y);
  let W = S + E;
  for (var i = lid; i < RV; i += ${wg}u) {
    var s = 0.0;
    for (var sp = 0u; sp < ${SPLIT}u; sp++) { s = s + Parts[((h * ${SPLIT}u + sp) * G + r) * RV + i]; }
    ws[i] = s;
  }
  workgroupBarrier();
  for (var e = lid; e < D; e += ${wg}u) {
    var o = 0.0;
    for (var i = 0u; i < RV; i++) { o = o + ws[i] * bv_at(i * HD + h * D + e); }
    for (var x = 0u; x < E; x++) { o = o + P[(h * G + r) * W + S + x] * Vx[(h * E + x) * D + e]; }
    result[(h * G + r) * D + e] = o;
  }
}`;
  try {
    return runWgsl({
      key: `valuecombine_${G}_${S}_${Rv}_${d}_${H}_${bv instanceof HalfTensor ? 'h' : 'f'}`,
      names: ['Parts', 'Bv', 'P', 'Vx'],
      inputs: [parts, bvIn.tensor, p, vx],
      outputShape: [H, G, d],
      dtype: 'float32',
      workgroupSize: wg,
      dispatch: [G, H, 1],
      workgroupBytes: workgroupBytes(G, d, Rv).valueCombine,
      code: combine,
    }) as tf.Tensor3D;
  } finally {
    parts.dispose();
  }
}
