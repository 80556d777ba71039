import * as tf from '@tensorflow/tfjs-core';
import { choleskyUpper, invertUpper, symmetricEigHost } from './hostla.js';
import { check } from './errors.js';

/**
 * Matrix product op(a)·op(b) on the tfjs backend. On wasm and cpu, tfjs's transposed kernels are
 * 15–50× slower than a plain product (measured: [8192×4096]·[4096×522] with transposeB 17.4 s vs
 * 1.0 s), so operands are transposed explicitly there.
 */
export function matmul(a: tf.Tensor2D, b: tf.Tensor2D, transposeA = false, transposeB = false): tf.Tensor2D {
  const be = tf.getBackend();
  if (be === 'wasm' || be === 'cpu') {
    return tf.tidy(() => tf.matMul(transposeA ? a.transpose() : a, transposeB ? b.transpose() : b));
  }
  return tf.matMul(a, b, transposeA, transposeB);
}

/**
 * Eigen-decomposition of a symmetric n×n matrix (row-major, symmetrized as (A + Aᵀ)/2) in float64 on
 * the host; eigenvalues descending, eigenvectors as columns. See hostla.ts.
 */
export function symmetricEig(a: Float64Array | Float32Array, n: number): { values: Float64Array; vectors: Float64Array } {
  check(a.length === n * n, 'shape', `symmetricEig: ${a.length} elements for ${n}×${n}`);
  const sym = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) sym[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
  return symmetricEigHost(sym, n);
}

/**
 * Orthonormal basis of the column space of Y [m, k]: the Gram matrix YᵀY (k×k) is formed on the
 * backend, factored on the host in float64 (Cholesky, so Q = Y·R⁻¹; or, when YᵀY is numerically
 * singular, its eigen-decomposition, dropping directions with λ < tol·λ_max), and applied on the
 * backend. `passes` = 2 repeats it on Q (Cholesky-QR2, Yamamoto et al. 2015) to restore float32
 * orthogonality. Returns Q [m, k'] with k' ≤ k.
 */
export async function orthonormalize(Y: tf.Tensor2D, passes = 2, tol = 1e-10): Promise<tf.Tensor2D> {
  let Q = tf.clone(Y);
  for (let p = 0; p < passes; p++) {
    const k = Q.shape[1];
    const G = matmul(Q, Q, true, false);
    const g = (await G.data()) as Float32Array;
    G.dispose();
    // Cholesky-QR: Q·R⁻¹ with GᵀG = RᵀR (k³/3 flops on the host); when G is numerically singular,
    // fall back to the eigen-decomposition, which drops the null directions.
    const R = choleskyUpper(g, k, 1e-7);
    let W: Float32Array;
    let keep = k;
    if (R) {
      W = Float32Array.from(invertUpper(R, k));
    } else {
      const { values, vectors } = symmetricEig(g, k);
      keep = Math.max(1, values.filter((v) => v > tol * Math.max(values[0], 1e-300)).length);
      W = new Float32Array(k * keep);
      for (let i = 0; i < k; i++) for (let j = 0; j < keep; j++) W[i * keep + j] = vectors[i * k + j] / Math.sqrt(Math.max(values[j], 1e-300));
    }
    const Wt = tf.tensor2d(W, [k, keep]);
    const next = matmul(Q, Wt);
    Wt.dispose();
    Q.dispose();
    Q = next;
  }
  return Q as tf.Tensor2D;
}

/**
 * A [rows, cols] float32 matrix of standard normal draws made on the host from `seed` (mulberry32
 * + Box–Muller), so that it is the same on every backend and for every seed. (tfjs's
 * `randomNormal` treats seed 0 as "no seed" and draws from Math.random.)
 */
export function gaussianMatrix(rows: number, cols: number, seed: number): tf.Tensor2D {
  let a = (Math.trunc(seed) ^ 0x9e3779b9) >>> 0;
  const uniform = (): number => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < out.length; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - uniform()));
    const th = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(th);
    if (i + 1 < out.length) out[i + 1] = r * Math.sin(th);
  }
  return tf.tensor2d(out, [rows, cols]);
}

/** Options of {@link truncatedSvd}. */
export interface TruncatedSvdOptions {
  /** Target rank r (1 ≤ r ≤ min(T, F)). */
  rank: number;
  /** Extra sketch columns p (Halko et al. 2011, §4.2). Default 8. */
  oversample?: number;
  /** Power (subspace) iterations q, each re-orthonormalized. Default 1. */
  powerIters?: number;
  /** Seed of the Gaussian test matrix Ω (drawn on the host, so identical on every backend). */
  seed?: number;
  /** Force an exact decomposition: the sketch covers min(T, F). */
  exact?: boolean;
}

/** Rank-r factors X ≈ basis · coeffs, with orthonormal basis columns. */
export interface LowRankFactors {
  /** Orthonormal token basis U_r, [T, r]. */
  basis: tf.Tensor2D;
  /** Coefficients S_r·V_rᵀ, [r, F]. */
  coeffs: tf.Tensor2D;
  /** The r leading singular values (float64 estimates). */
  singularValues: Float64Array;
}

/**
 * Truncated SVD of X [T, F] by the randomized range finder with power iterations (Halko, Martinsson
 * & Tropp 2011, Alg. 4.4 + 5.1): Y = X·Ω, Q = orth(Y), B = Qᵀ·X, B·Bᵀ = W Λ Wᵀ on the host in float64,
 * basis = Q·W_r, coeffs = W_rᵀ·B. The large products run on the tfjs backend; only k×k matrices
 * (k = r + oversample) go to the host. When k ≥ min(T, F) the sketch spans X's range and the result
 * is the exact truncated SVD (up to float32 rounding).
 * @throws KvpackError('rank') when rank is not an integer in [1, min(T, F)].
 */
export async function truncatedSvd(X: tf.Tensor2D, opts: TruncatedSvdOptions): Promise<LowRankFactors> {
  const [T, F] = X.shape;
  const m = Math.min(T, F);
  const r = opts.rank;
  check(Number.isInteger(r) && r >= 1 && r <= m, 'rank', `rank ${r} is out of range: it must be an integer in [1, min(T=${T}, features=${F}) = ${m}]`);
  const k = opts.exact ? m : Math.min(m, r + (opts.oversample ?? 8));
  const q = k >= m ? 0 : opts.powerIters ?? 1;
  if (k >= m && T > F) return exactTallSvd(X, r);
  let Q: tf.Tensor2D;
  if (k >= m && T <= F) {
    Q = tf.eye(T) as tf.Tensor2D; // the range of X is all of R^T
  } else {
    const omega = gaussianMatrix(F, k, opts.seed ?? 0);
    const Y = matmul(X, omega);
    omega.dispose();
    Q = await orthonormalize(Y, q > 0 ? 1 : 2);
    Y.dispose();
    for (let i = 0; i < q; i++) {
      const Z = matmul(X, Q, true, false); // [F, k]
      Q.dispose();
      const Zq = await orthonormalize(Z, 1);
      Z.dispose();
      const Y2 = matmul(X, Zq);
      Zq.dispose();
      Q = await orthonormalize(Y2, i === q - 1 ? 2 : 1);
      Y2.dispose();
    }
  }
  const B = matmul(Q, X, true, false); // [k', F]
  const kk = B.shape[0];
  const BBt = matmul(B, B, false, true);
  const g = (await BBt.data()) as Float32Array;
  BBt.dispose();
  const { values, vectors } = symmetricEig(g, kk);
  const rr = Math.min(r, kk);
  const W = new Float32Array(kk * r); // zero columns pad a numerically rank-deficient X
  for (let i = 0; i < kk; i++) for (let j = 0; j < rr; j++) W[i * r + j] = vectors[i * kk + j];
  const Wt = tf.tensor2d(W, [kk, r]);
  const basis = matmul(Q, Wt);
  const coeffs = matmul(Wt, B, true, false);
  tf.dispose([Wt, B, Q]);
  const singularValues = new Float64Array(r);
  for (let j = 0; j < rr; j++) singularValues[j] = Math.sqrt(Math.max(values[j], 0));
  return { basis, coeffs, singularValues };
}

/**
 * Exact truncated SVD of a tall X [T, F] (T > F) from the right: V = eigenvectors of the F×F Gram
 * XᵀX (float64 on the host), basis = X·V_r·diag(1/σ), coeffs = diag(σ)·V_rᵀ with σ the column norms
 * of X·V_r. The product is X·V_r·V_rᵀ with V orthonormal in float64, so the reconstruction error
 * stays at the truncation error even where float32 Cholesky-QR of X·Ω would lose orthogonality on a
 * wide singular-value range (it is exact to float32 rounding at full rank).
 */
async function exactTallSvd(X: tf.Tensor2D, r: number): Promise<LowRankFactors> {
  const F = X.shape[1];
  const G = matmul(X, X, true, false);
  const g = (await G.data()) as Float32Array;
  G.dispose();
  const { vectors } = symmetricEig(g, F);
  const V = new Float32Array(F * r);
  for (let i = 0; i < F; i++) for (let j = 0; j < r; j++) V[i * r + j] = vectors[i * F + j];
  const Vr = tf.tensor2d(V, [F, r]);
  const XV = matmul(X, Vr); // [T, r], column j = σ_j u_j
  const norms = tf.tidy(() => tf.sqrt(tf.sum(tf.square(XV), 0)));
  const sigma = Float64Array.from((await norms.data()) as Float32Array);
  norms.dispose();
  const inv = Float32Array.from(sigma, (s) => (s > 0 ? 1 / s : 0));
  const [basis, coeffs] = tf.tidy(() => {
    const iv = tf.tensor2d(inv, [1, r]);
    const sv = tf.tensor2d(Float32Array.from(sigma), [r, 1]);
    return [tf.mul(XV, iv) as tf.Tensor2D, tf.mul(Vr.transpose(), sv) as tf.Tensor2D];
  });
  tf.dispose([Vr, XV]);
  return { basis, coeffs, singularValues: sigma };
}

/** ‖X − A‖_F / ‖X‖_F, computed on the backend. */
export async function relativeFrobeniusError(X: tf.Tensor, A: tf.Tensor): Promise<number> {
  const r = tf.tidy(() => tf.stack([tf.sum(tf.square(tf.sub(X, A))), tf.sum(tf.square(X))]));
  const [num, den] = await r.data();
  r.dispose();
  return Math.sqrt(num / den);
}
