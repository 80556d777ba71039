import * as tf from '@tensorflow/tfjs-core';
import { check } from './errors.js';
import { runWgsl } from './webgpu.js';

/** Largest k of {@link gramCholInverseWgsl} (k/32 + 1 dispatches: beyond this a factorization is better done another way). */
export const GRAM_CHOL_MAX = 2048;
/**
 * Shift added to the diagonal, relative to the largest diagonal entry (shifted Cholesky-QR, Fukaya et
 * al. 2020): float32 Cholesky of a Gram matrix whose condition number nears 1/ε would fail; with the
 * shift it always succeeds, and directions of S weaker than √shift of its largest come out of S·W
 * with norm below 1 instead of blowing up (a second pass on S·W restores them, as in Cholesky-QR2).
 */
export const GRAM_CHOL_SHIFT = 1e-6;

/** Block size b of the blocked factorization (a b×b tile is 4 KiB of workgroup memory). */
const B = 32;
/** Row stride of a tile in workgroup memory (b + 1: column reads hit distinct banks). */
const P = B + 1;
/** Invocations per workgroup: 32 columns × 8 row groups, four rows of a tile each. */
const WG = 256;

// The stepped kernel: workgroup x owns a block row of L (Cholesky) or of W (inverse) (made
// workgroup-uniform: it bounds loops with barriers); the step index is a program uniform (no upload).
const COMMON = `
const B: u32 = ${B}u;
const P: u32 = ${P}u;
var<workgroup> Dm: array<f32, ${B * P}>;
var<workgroup> Ta: array<f32, ${B * P}>;
var<workgroup> Tb: array<f32, ${B * P}>;
var<workgroup> red: array<f32, ${WG}>;
var<workgroup> blockW: u32;
`;

/**
 * Step j of a left-looking blocked Cholesky of A = (G + Gᵀ)/2 + s·I (s = SHIFT·max diag G), padded
 * with the identity to K = ⌈k_max/b⌉·b (k_max the largest matrix of the batch): block row i computes its block of column j,
 * L_ij = (A_ij − Σ_{m<j} L_im·L_jmᵀ)·L_jj⁻ᵀ, with L_jj the factor of A_jj − Σ_{m<j} L_jm·L_jmᵀ
 * (factored in workgroup memory by every workgroup; b³/3 multiply–adds); columns < j are copied
 * from the previous step's L, columns > j are zero.
 */
const CHOL_CODE = `
fn aAt(g0: u32, r: u32, c: u32, k: u32, s: f32) -> f32 {
  if (r < k && c < k) {
    let v = 0.5 * (G[g0 + r * GS + c] + G[g0 + c * GS + r]);
    return select(v, v + s, r == c);
  }
  return select(0.0, 1.0, r == c);
}
// Block row i of L at column step j (j ≤ nb − 1; at j = nb the finished L is only copied) of a
// matrix of size k: L at state offset l0, G at g0 (row stride GS; entries past k read as the identity).
fn cholStep(lid: u32, i: u32, j: u32, k: u32, K: u32, g0: u32, l0: u32) {
  var mx = 0.0;
  for (var q = lid; q < k; q += ${WG}u) { mx = max(mx, G[g0 + q * GS + q]); }
  red[lid] = mx;
  workgroupBarrier();
  for (var h = ${WG / 2}u; h > 0u; h = h >> 1u) {
    if (lid < h) { red[lid] = max(red[lid], red[lid + h]); }
    workgroupBarrier();
  }
  let s = max(${GRAM_CHOL_SHIFT} * red[0], 1e-30);
  for (var e = lid; e < B * K; e += ${WG}u) {
    let r = i * B + e / K;
    let c = e % K;
    if (c < j * B) { result[l0 + r * K + c] = S[l0 + r * K + c]; }
    else if (c >= (j + 1u) * B || i < j) { result[l0 + r * K + c] = 0.0; }
  }
  if (i < j || j * B >= K) { return; }
  let tx = lid % B;
  let ty = lid / B;
  var dacc: array<f32, 4>;
  var cacc: array<f32, 4>;
  for (var q = 0u; q < 4u; q++) {
    let r = ty + 8u * q;
    dacc[q] = aAt(g0, j * B + r, j * B + tx, k, s);
    cacc[q] = aAt(g0, i * B + r, j * B + tx, k, s);
  }
  for (var m = 0u; m < j; m++) {
    for (var e = lid; e < B * B; e += ${WG}u) {
      let r = e / B;
      let c = e % B;
      Tb[r * P + c] = S[l0 + (j * B + r) * K + m * B + c];
      Ta[r * P + c] = S[l0 + (i * B + r) * K + m * B + c];
    }
    workgroupBarrier();
    for (var q = 0u; q < 4u; q++) {
      let r = ty + 8u * q;
      var sd = 0.0;
      var sc = 0.0;
      for (var c = 0u; c < B; c++) {
        let t = Tb[tx * P + c];
        sd = sd + Tb[r * P + c] * t;
        sc = sc + Ta[r * P + c] * t;
      }
      dacc[q] = dacc[q] - sd;
      cacc[q] = cacc[q] - sc;
    }
    workgroupBarrier();
  }
  for (var q = 0u; q < 4u; q++) { Dm[(ty + 8u * q) * P + tx] = dacc[q]; }
  workgroupBarrier();
  for (var c = 0u; c < B; c++) {
    if (lid == 0u) { Dm[c * P + c] = sqrt(max(Dm[c * P + c], s)); }
    workgroupBarrier();
    if (lid > c && lid < B) { Dm[lid * P + c] = Dm[lid * P + c] / Dm[c * P + c]; }
    workgroupBarrier();
    for (var e = lid; e < B * B; e += ${WG}u) {
      let r = e / B;
      let q = e % B;
      if (q > c && q <= r) { Dm[r * P + q] = Dm[r * P + q] - Dm[r * P + c] * Dm[q * P + c]; }
    }
    workgroupBarrier();
  }
  if (i == j) {
    for (var e = lid; e < B * B; e += ${WG}u) {
      let r = e / B;
      let c = e % B;
      result[l0 + (j * B + r) * K + j * B + c] = select(0.0, Dm[r * P + c], c <= r);
    }
    return;
  }
  // L_ij = C·L_jj⁻ᵀ: each row x of it solves x·L_jjᵀ = c (forward substitution along the row).
  for (var q = 0u; q < 4u; q++) { Ta[(ty + 8u * q) * P + tx] = cacc[q]; }
  workgroupBarrier();
  if (lid < B) {
    for (var c = 0u; c < B; c++) {
      var v = Ta[lid * P + c];
      for (var q = 0u; q < c; q++) { v = v - Ta[lid * P + q] * Dm[c * P + q]; }
      Ta[lid * P + c] = v / Dm[c * P + c];
    }
  }
  workgroupBarrier();
  for (var e = lid; e < B * B; e += ${WG}u) {
    let r = e / B;
    let c = e % B;
    result[l0 + (i * B + r) * K + j * B + c] = Ta[r * P + c];
  }
}`;

/**
 * Step i of W = (L⁻¹)ᵀ by block rows of X = L⁻¹: X_ii = L_ii⁻¹ and, for j < i,
 * X_ij = −L_ii⁻¹·Σ_{m=j}^{i−1} L_im·X_mj; workgroup j writes W_ji = X_ijᵀ (zero below the diagonal)
 * and copies the rest of W's block row j from the previous step.
 */
const INV_CODE = `
// Block row j of W at step i (i = −1: zeros) of matrix b: the finished rows ≤ i of L at state offset
// l0, W at w0.
fn invStep(lid: u32, si: i32, j: u32, K: u32, l0: u32, w0: u32) {
  if (si < 0) {
    for (var e = lid; e < B * K; e += ${WG}u) { result[w0 + j * B * K + e] = 0.0; }
    return;
  }
  let iu = u32(si);
  for (var e = lid; e < B * K; e += ${WG}u) {
    let r = j * B + e / K;
    let c = e % K;
    if (c < iu * B || c >= (iu + 1u) * B) { result[w0 + r * K + c] = S[w0 + r * K + c]; }
    else if (j > iu) { result[w0 + r * K + c] = 0.0; }
  }
  if (j > iu) { return; }
  let i = iu;
  let tx = lid % B;
  let ty = lid / B;
  for (var e = lid; e < B * B; e += ${WG}u) {
    let r = e / B;
    let c = e % B;
    Dm[r * P + c] = S[l0 + (i * B + r) * K + i * B + c];
  }
  workgroupBarrier();
  // L_ii⁻¹ into Tb, one column per invocation (forward substitution).
  if (lid < B) {
    for (var r = 0u; r < B; r++) {
      var v = select(0.0, 1.0, r == lid);
      for (var q = lid; q < r; q++) { v = v - Dm[r * P + q] * Tb[q * P + lid]; }
      Tb[r * P + lid] = select(0.0, v / Dm[r * P + r], r >= lid);
    }
  }
  workgroupBarrier();
  if (j == i) {
    for (var e = lid; e < B * B; e += ${WG}u) {
      let r = e / B;
      let c = e % B;
      result[w0 + (i * B + r) * K + i * B + c] = Tb[c * P + r];
    }
    return;
  }
  var acc: array<f32, 4>;
  for (var m = j; m < i; m++) {
    for (var e = lid; e < B * B; e += ${WG}u) {
      let r = e / B;
      let c = e % B;
      Ta[r * P + c] = S[l0 + (i * B + r) * K + m * B + c];
      // X_mj[c][r] = W_jm[r][c]: row r of W's block (j, m), read along its columns.
      Dm[c * P + r] = S[w0 + (j * B + r) * K + m * B + c];
    }
    workgroupBarrier();
    for (var q = 0u; q < 4u; q++) {
      let r = ty + 8u * q;
      var sum = 0.0;
      for (var c = 0u; c < B; c++) { sum = sum + Ta[r * P + c] * Dm[c * P + tx]; }
      acc[q] = acc[q] + sum;
    }
    workgroupBarrier();
  }
  for (var q = 0u; q < 4u; q++) { Ta[(ty + 8u * q) * P + tx] = acc[q]; }
  workgroupBarrier();
  for (var q = 0u; q < 4u; q++) {
    let r = ty + 8u * q;
    var x = 0.0;
    for (var t = 0u; t < B; t++) { x = x - Tb[r * P + t] * Ta[t * P + tx]; }
    Dm[tx * P + r] = x;
  }
  workgroupBarrier();
  for (var e = lid; e < B * B; e += ${WG}u) {
    let r = e / B;
    let c = e % B;
    result[w0 + (j * B + r) * K + i * B + c] = Dm[r * P + c];
  }
}`;

/**
 * Step s of the factorization of a batch of Gram matrices: the state S [n, 2, K, K] holds each
 * matrix's L and W. Workgroup x of matrix b (2·nb per matrix, along x): x < nb computes Cholesky block row x at column step s, x ≥ nb
 * inverse block row x − nb at step s − 1 (its rows of L are final one step earlier), so the two run
 * side by side: nb + 1 dispatches in all, for every matrix of the batch at once.
 */
const STEP_CODE = `${COMMON}
// Row stride of the stacked Gram matrices.
var<private> GS: u32;
${CHOL_CODE}
${INV_CODE}
fn kernel(index: i32) {
  let lid = localIndex;
  GS = u32(uniforms.gs);
  let K = u32(uniforms.outShape.z);
  let nb = K / B;
  // Workgroups run along x only (matrix b's 2·nb side by side): tfjs generates other code, another
  // pipeline, for a grid with y > 1.
  if (lid == 0u) { blockW = workgroupId.x; }
  let w = workgroupUniformLoad(&blockW);
  let b = w / (2u * nb);
  let x = w % (2u * nb);
  // This matrix's size (the batch is stacked padded to the largest, row stride GS).
  let k = u32(select(select(select(uniforms.k3, uniforms.k2, b == 2u), uniforms.k1, b == 1u), uniforms.k0, b == 0u));
  let s = u32(uniforms.step);
  let l0 = b * 2u * K * K;
  if (x < nb) { cholStep(lid, x, s, k, K, b * GS * GS, l0); }
  else { invStep(lid, i32(s) - 1, x - nb, K, l0, l0 + K * K); }
}`;

/**
 * W = R⁻¹ [k, k] (upper triangular) for a Gram matrix G = SᵀS [k, k] (float32, symmetric positive
 * semi-definite; only (G + Gᵀ)/2 is read), with (G + s·I) = RᵀR its Cholesky factorization,
 * s = {@link GRAM_CHOL_SHIFT}·max diag(G): S·W then has orthonormal columns (up to the shift and
 * float32 rounding). Blocked over 32×32 tiles on the webgpu backend: a left-looking Cholesky one
 * block column per dispatch, with the inverse one block row per dispatch running a step behind in
 * the same dispatches, ⌈k/32⌉ + 1 dispatches of 2·⌈k/32⌉ workgroups; each tile product in workgroup
 * memory. (A single-workgroup factorization, a k³/3 chain of dependent global-memory updates on one
 * compute unit, took 82 ms at k = 512 on an H100; this form spreads the work over compute units and
 * keeps each tile's updates on-chip.) Pivots are floored at s, so a singular G still gives finite W.
 * See {@link gramCholInverseWgslBatch} for several matrices in the same dispatches.
 * @throws KvpackError('shape') for a G that is not square or larger than {@link GRAM_CHOL_MAX};
 *   KvpackError('unsupported') off the webgpu backend.
 */
export function gramCholInverseWgsl(G: tf.Tensor2D): tf.Tensor2D {
  return gramCholInverseWgslBatch([G])[0];
}

/** Most Gram matrices of one {@link gramCholInverseWgslBatch} dispatch sequence (longer batches run in chunks). */
export const GRAM_CHOL_BATCH = 4;

/**
 * {@link gramCholInverseWgsl} of several Gram matrices (sizes k_b may differ) in the same
 * ⌈max k_b/32⌉ + 1 dispatches, {@link GRAM_CHOL_BATCH} at a time: the matrices side by side in each
 * dispatch (a step's time is its slowest workgroup, so a batch costs about what its largest matrix
 * does), smaller ones padded with the identity, which leaves their factors unchanged. Each W equals
 * the one factored alone, bit for bit. Disposes no input.
 * @throws KvpackError('shape') for an empty batch, or a matrix that is not square or is larger than
 *   {@link GRAM_CHOL_MAX}; KvpackError('unsupported') off the webgpu backend.
 */
export function gramCholInverseWgslBatch(Gs: readonly tf.Tensor2D[]): tf.Tensor2D[] {
  check(Gs.length >= 1, 'shape', 'gramCholInverseWgsl: no matrices');
  check(
    Gs.every((G) => G.rank === 2 && G.shape[0] === G.shape[1] && G.shape[0] >= 1 && G.shape[0] <= GRAM_CHOL_MAX),
    'shape',
    `gramCholInverseWgsl: every G must be square, 1 ≤ k ≤ ${GRAM_CHOL_MAX}, got ${Gs.map((G) => `[${G.shape}]`).join(', ')}`,
  );
  if (Gs.length > GRAM_CHOL_BATCH) {
    const out: tf.Tensor2D[] = [];
    for (let i = 0; i < Gs.length; i += GRAM_CHOL_BATCH) out.push(...gramCholInverseWgslBatch(Gs.slice(i, i + GRAM_CHOL_BATCH)));
    return out;
  }
  const n = Gs.length;
  const ks = Gs.map((G) => G.shape[0]);
  const kmax = Math.max(...ks);
  const nb = Math.ceil(kmax / B);
  const K = nb * B;
  const tiles = 4 * (3 * B * P + WG + 1);
  const sizes = [0, 1, 2, 3].map((b) => ({ name: `k${b}`, type: 'i32' as const, value: ks[b] ?? 0 }));
  return tf.tidy(() => {
    // G stacked [n, kmax, kmax] (a smaller matrix zero-padded; the kernel reads past its size as the
    // identity). G and the state go in flat: tfjs keys its pipelines by the inputs' ranks and
    // broadcasts against the output, so flat inputs keep one pipeline for every batch and size.
    const padded = Gs.map((G) => (G.shape[0] === kmax ? G : tf.pad(G, [[0, kmax - G.shape[0]], [0, kmax - G.shape[0]]])));
    const flat = tf.reshape(n === 1 ? padded[0] : tf.stack(padded), [-1]);
    // A single 1×1 G would be a one-element input, which tfjs broadcasts: another pipeline.
    const G = flat.size === 1 ? tf.pad(flat, [[0, 1]]) : flat;
    // The state starts as G itself: step 0 reads no earlier L or W.
    let state: tf.Tensor = G;
    for (let step = 0; step <= nb; step++) {
      const next = runWgsl({
        key: 'gram_chol_inverse_step_32',
        names: ['G', 'S'],
        inputs: [G, tf.reshape(state, [-1])],
        outputShape: [n, 2, K, K],
        dtype: 'float32',
        workgroupSize: WG,
        dispatch: [2 * nb * n, 1, 1],
        workgroupBytes: tiles,
        code: STEP_CODE,
        uniforms: [{ name: 'step', type: 'i32', value: step }, { name: 'gs', type: 'i32', value: kmax }, ...sizes],
      });
      if (state !== G) state.dispose();
      state = next;
    }
    return ks.map((k, b) => tf.reshape(tf.slice(state, [b, 1, 0, 0], [1, 1, k, k]), [k, k]) as tf.Tensor2D);
  });
}
