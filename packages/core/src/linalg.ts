import * as tf from '@tensorflow/tfjs-core';
import { EigenvalueDecomposition, Matrix } from 'ml-matrix';
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

/** Eigen-decomposition of a symmetric n×n float64 matrix (row-major), eigenvalues descending. */
export function symmetricEig(a: Float64Array | Float32Array, n: number): { values: Float64Array; vectors: Float64Array } {
  check(a.length === n * n, 'shape', `symmetricEig: ${a.length} elements for ${n}×${n}`);
  const rows: number[][] = [];
  for (let i = 0; i < n; i++) {
    const r = new Array<number>(n);
    for (let j = 0; j < n; j++) r[j] = 0.5 * (a[i * n + j] + a[j * n + i]);
    rows.push(r);
  }
  const evd = new EigenvalueDecomposition(new Matrix(rows), { assumeSymmetric: true });
  const vals = evd.realEigenvalues;
  const V = evd.eigenvectorMatrix;
  const order = vals.map((_, i) => i).sort((x, y) => vals[y] - vals[x]);
  const values = new Float64Array(n);
  const vectors = new Float64Array(n * n); // column j = eigenvector j
  order.forEach((src, j) => {
    values[j] = vals[src];
    for (let i = 0; i < n; i++) vectors[i * n + j] = V.get(i, src);
  });
  return { values, vectors };
}

/**
 * Orthonormal basis of the column space of Y [m, k] via the Gram matrix YᵀY (k×k, on the backend)
 * and its float64 eigen-decomposition on the host: Q = Y·W·Λ^(-1/2), dropping directions with
 * λ < tol·λ_max. `passes` = 2 repeats it once more on Q (as Cholesky-QR2) for float32 orthogonality.
 * Returns Q [m, k'] with k' ≤ k.
 */
export async function orthonormalize(Y: tf.Tensor2D, passes = 2, tol = 1e-10): Promise<tf.Tensor2D> {
  let Q = tf.clone(Y);
  for (let p = 0; p < passes; p++) {
    const k = Q.shape[1];
    const G = matmul(Q, Q, true, false);
    const g = (await G.data()) as Float32Array;
    G.dispose();
    const { values, vectors } = symmetricEig(g, k);
    const keep = Math.max(1, values.filter((v) => v > tol * Math.max(values[0], 1e-300)).length);
    const W = new Float32Array(k * keep);
    for (let i = 0; i < k; i++) for (let j = 0; j < keep; j++) W[i * keep + j] = vectors[i * k + j] / Math.sqrt(Math.max(values[j], 1e-300));
    const Wt = tf.tensor2d(W, [k, keep]);
    const next = matmul(Q, Wt);
    Wt.dispose();
    Q.dispose();
    Q = next;
  }
  return Q as tf.Tensor2D;
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
  let Q: tf.Tensor2D;
  if (k >= m && T <= F) {
    Q = tf.eye(T) as tf.Tensor2D; // the range of X is all of R^T
  } else {
    const omega = tf.randomNormal([F, k], 0, 1, 'float32', opts.seed ?? 0) as tf.Tensor2D;
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

/** ‖X − A‖_F / ‖X‖_F, computed on the backend. */
export async function relativeFrobeniusError(X: tf.Tensor, A: tf.Tensor): Promise<number> {
  const r = tf.tidy(() => tf.stack([tf.sum(tf.square(tf.sub(X, A))), tf.sum(tf.square(X))]));
  const [num, den] = await r.data();
  r.dispose();
  return Math.sqrt(num / den);
}
