import type * as tf from '@tensorflow/tfjs-core';
import { check } from './errors.js';
import { runWgsl } from './webgpu.js';

/** Largest k of {@link gramCholInverseWgsl} (one pivot column is held in workgroup memory). */
export const GRAM_CHOL_MAX = 2048;
/** Invocations of its single workgroup. */
const WG = 256;
/**
 * Shift added to the diagonal, relative to the largest diagonal entry (shifted Cholesky-QR, Fukaya et
 * al. 2020): float32 Cholesky of a Gram matrix whose condition number nears 1/ε would fail; with the
 * shift it always succeeds, and directions of S weaker than √shift of its largest come out of S·W
 * with norm below 1 instead of blowing up (a second pass on S·W restores them, as in Cholesky-QR2).
 */
export const GRAM_CHOL_SHIFT = 1e-6;

/**
 * W = R⁻¹ [k, k] (upper triangular) for a Gram matrix G = SᵀS [k, k] (float32, symmetric positive
 * semi-definite; only (G + Gᵀ)/2 is read), with (G + s·I) = RᵀR its Cholesky factorization,
 * s = {@link GRAM_CHOL_SHIFT}·max diag(G): S·W then has orthonormal columns (up to the shift and
 * float32 rounding). Runs as ONE webgpu dispatch (a single workgroup: right-looking Cholesky, then
 * the in-place inverse of the triangular factor by forward substitution, then a transpose), instead of the
 * 25–30 k×k products and ~40 elementwise kernels of a Newton–Schulz iteration: on a GPU whose
 * per-dispatch cost (~0.4 ms measured for a 512³ product on an H100 under Dawn) exceeds the
 * arithmetic, one dispatch of k³/3 + k³/3 multiply-adds on one compute unit is the cheaper form.
 * @throws KvpackError('shape') for a G that is not square or larger than {@link GRAM_CHOL_MAX};
 *   KvpackError('unsupported') off the webgpu backend.
 */
export function gramCholInverseWgsl(G: tf.Tensor2D): tf.Tensor2D {
  const [k, k2] = G.shape;
  check(G.rank === 2 && k === k2 && k >= 1 && k <= GRAM_CHOL_MAX, 'shape', `gramCholInverseWgsl: G must be square with 1 ≤ k ≤ ${GRAM_CHOL_MAX}, got [${G.shape}]`);
  return runWgsl({
    key: `gram_chol_inv_${WG}`,
    names: ['G'],
    inputs: [G],
    outputShape: [k, k],
    dtype: 'float32',
    workgroupSize: WG,
    dispatch: [1, 1, 1],
    workgroupBytes: 4 * (GRAM_CHOL_MAX + WG),
    code: `
var<workgroup> col: array<f32, ${GRAM_CHOL_MAX}>;
var<workgroup> red: array<f32, ${WG}>;
fn kernel(index: i32) {
  let n = u32(uniforms.gShape.y);
  let lid = localIndex;
  // Shift s = SHIFT · max diag(G).
  var m = 0.0;
  for (var i = lid; i < n; i += ${WG}u) { m = max(m, G[i * n + i]); }
  red[lid] = m;
  workgroupBarrier();
  for (var h = ${WG / 2}u; h > 0u; h = h >> 1u) {
    if (lid < h) { red[lid] = max(red[lid], red[lid + h]); }
    workgroupBarrier();
  }
  let shift = max(${GRAM_CHOL_SHIFT} * red[0], 1e-30);
  // L ← lower triangle of (G + Gᵀ)/2 + s·I; upper triangle 0.
  for (var idx = lid; idx < n * n; idx += ${WG}u) {
    let i = idx / n;
    let j = idx % n;
    var v = 0.0;
    if (j <= i) {
      v = 0.5 * (G[idx] + G[j * n + i]);
      if (i == j) { v += shift; }
    }
    result[idx] = v;
  }
  storageBarrier();
  // Right-looking Cholesky G + s·I = L·Lᵀ: per column j, scale it by √pivot (held in col), then
  // update the trailing lower triangle, 16×16 invocations striding over (row, column).
  let tx = lid % 16u;
  let ty = lid / 16u;
  for (var j = 0u; j < n; j++) {
    let piv = sqrt(max(result[j * n + j], shift));
    workgroupBarrier(); // every invocation has read the pivot before it is overwritten
    for (var i = j + lid; i < n; i += ${WG}u) {
      var v = piv;
      if (i > j) { v = result[i * n + j] / piv; }
      col[i] = v;
      result[i * n + j] = v;
    }
    workgroupBarrier();
    for (var i = j + 1u + ty; i < n; i += 16u) {
      let ci = col[i];
      for (var l = j + 1u + tx; l <= i; l += 16u) { result[i * n + l] -= ci * col[l]; }
    }
    storageBarrier();
  }
  // In-place inverse of L by forward substitution L·X = I, row j at a time: X[j, :j] = S[j, :j]/L[j, j]
  // (S the sums accumulated so far), X[j, j] = 1/L[j, j], then every later row i takes
  // S[i, :j+1] −= L[i, j]·X[j, :j+1] — a rank-1 update spread over 16×16 invocations, like the
  // factorization's. Entry (i, c), c < i, holds L[i, c] until step c reads column c, then S[i, c].
  for (var j = 0u; j < n; j++) {
    let inv = 1.0 / result[j * n + j];
    for (var i = j + 1u + lid; i < n; i += ${WG}u) { col[i] = result[i * n + j]; }
    workgroupBarrier(); // the pivot and column j are read before row j is rewritten
    for (var c = lid; c <= j; c += ${WG}u) {
      if (c == j) { result[j * n + j] = inv; } else { result[j * n + c] *= inv; }
    }
    storageBarrier();
    for (var i = j + 1u + ty; i < n; i += 16u) {
      let li = col[i];
      for (var c = tx; c <= j; c += 16u) {
        if (c == j) { result[i * n + j] = -li * inv; } else { result[i * n + c] -= li * result[j * n + c]; }
      }
    }
    storageBarrier();
  }
  // W = (L⁻¹)ᵀ, upper triangular.
  for (var idx = lid; idx < n * n; idx += ${WG}u) {
    let i = idx / n;
    let j = idx % n;
    if (i > j) {
      result[j * n + i] = result[idx];
      result[idx] = 0.0;
    }
  }
}`,
  }) as tf.Tensor2D;
}
