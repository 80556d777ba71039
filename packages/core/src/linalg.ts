import * as tf from '@tensorflow/tfjs-core';
import { choleskyUpper, invertUpper, symmetricEigHost } from './hostla.js';
import { check } from './errors.js';
import { isHostBackend } from './backend.js';
import { GRAM_CHOL_MAX, gramCholInverseWgsl, gramCholInverseWgslBatch } from './gram-chol-wgsl.js';
import { isWebGpuBackend } from './webgpu.js';
import { mulberry32, normalPair } from './random.js';
import { sparseSignDense, sparseSignMatrix, sparseSignProductWgsl, sparseSignRowsProductWgsl } from './sparse-sign.js';
import { MAX_ORTHONORMALIZE_PASSES, MAX_OVERSAMPLE, MAX_POWER_ITERS, MAX_SEED, MIN_SEED } from './limits.js';

/**
 * Matrix product op(a)·op(b) on the tfjs backend. On wasm and cpu, tfjs's transposed kernels are
 * 15–50× slower than a plain product (measured: [8192×4096]·[4096×522] with transposeB 17.4 s vs
 * 1.0 s), so operands are transposed explicitly there.
 */
export function matmul(a: tf.Tensor2D, b: tf.Tensor2D, transposeA = false, transposeB = false): tf.Tensor2D {
  if (isHostBackend()) {
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
 * Where {@link truncatedSvd} and the orthonormalizations do their k×k work (k = rank + oversample):
 * - `host`: the Gram matrix YᵀY is read back and factored in float64 on the host (Cholesky-QR);
 * - `device`: everything stays on the tfjs backend (no host round-trip): on webgpu each Gram matrix
 *   is factored by the blocked WGSL shifted Cholesky and inverse ({@link deviceCholesky}), elsewhere
 *   by a Newton–Schulz iteration for (YᵀY)^(-1/2) (24–27 k×k float32 products per pass, see
 *   {@link orthonormalizeDevice});
 * - `auto` (default): `host` on the wasm and cpu backends (where the backend's k×k products are no
 *   faster than host float64 code), `device` elsewhere (webgpu, webgl, tensorflow), where a host
 *   factorization of k = 512 (≥ 50–300 ms in JS) would cost more than the whole sketch.
 */
export type Orthogonalization = 'auto' | 'host' | 'device';

/** Resolves `auto` for the current tfjs backend (see {@link Orthogonalization}). */
export function resolveOrthogonalization(o: Orthogonalization = 'auto'): 'host' | 'device' {
  check(o === 'auto' || o === 'host' || o === 'device', 'config', `orthogonalization must be 'auto', 'host' or 'device', got ${String(o)}`);
  if (o !== 'auto') return o;
  return isHostBackend() ? 'host' : 'device';
}

/**
 * Host factor of a Gram matrix G = SᵀS [k, k] (read back, float64): W [k, k'] with S·W orthonormal.
 * Cholesky G = RᵀR gives W = R⁻¹ (k³/3 + k³/3 flops); when G is numerically singular, its
 * eigen-decomposition gives W = V_k'·Λ_k'^(-1/2), dropping directions with λ < tol·λ_max.
 * Does not dispose G.
 */
async function hostGramFactor(G: tf.Tensor2D, tol = 1e-10): Promise<tf.Tensor2D> {
  const k = G.shape[0];
  const g = (await G.data()) as Float32Array;
  const R = choleskyUpper(g, k, 1e-7);
  if (R) {
    const W = tf.tensor2d(Float32Array.from(invertUpper(R, k)), [k, k]);
    return W;
  }
  const { values, vectors } = symmetricEig(g, k);
  const keep = Math.max(1, values.filter((v) => v > tol * Math.max(values[0], 1e-300)).length);
  const W = new Float32Array(k * keep);
  for (let i = 0; i < k; i++) for (let j = 0; j < keep; j++) W[i * keep + j] = vectors[i * k + j] / Math.sqrt(Math.max(values[j], 1e-300));
  return tf.tensor2d(W, [k, keep]);
}

/**
 * Orthonormal basis of the column space of Y [m, k], on the host: the Gram matrix YᵀY (k×k) is
 * formed on the backend, factored on the host in float64 (Cholesky, so Q = Y·R⁻¹; or, when YᵀY is
 * numerically singular, its eigen-decomposition, dropping directions with λ < tol·λ_max), and
 * applied on the backend. `passes` = 2 repeats it on Q (Cholesky-QR2, Yamamoto et al. 2015) to
 * restore float32 orthogonality. Returns Q [m, k'] with k' ≤ k. Does not dispose Y.
 */
export async function orthonormalize(Y: tf.Tensor2D, passes = 2, tol = 1e-10): Promise<tf.Tensor2D> {
  checkPasses(passes);
  let Q = Y;
  for (let p = 0; p < passes; p++) {
    const G = matmul(Q, Q, true, false);
    const W = await hostGramFactor(G, tol);
    const next = matmul(Q, W);
    tf.dispose([G, W]);
    if (Q !== Y) Q.dispose();
    Q = next;
  }
  return Q === Y ? tf.clone(Y) : Q;
}

function checkPasses(passes: number): void {
  check(
    Number.isInteger(passes) && passes >= 0 && passes <= MAX_ORTHONORMALIZE_PASSES,
    'config',
    `orthonormalize: passes must be an integer in [0, ${MAX_ORTHONORMALIZE_PASSES}], got ${passes}`,
  );
}

/** Ridge added to the scaled Gram matrix in {@link orthonormalizeDevice}: directions of Y below ~1e-3 of its largest are not blown up. */
const NS_RIDGE = 1e-6;
/**
 * Odd quintic σ ↦ aσ + bσ³ + cσ⁵ (the coefficients of the Muon optimizer's Newton–Schulz
 * orthogonalization, K. Jordan 2024): it multiplies small singular values by a ≈ 3.44 per step and
 * maps (0, 1] into [0.68, 1.2] after 6 steps from σ ≥ 1e-3; cubic Newton–Schulz steps then converge
 * quadratically to 1.
 */
const NS_QUINTIC = [3.4445, -4.775, 2.0315] as const;

/**
 * Steps of one Newton–Schulz pass (see {@link newtonSchulzInvSqrt}): `quintic` growth steps, then
 * `cubic` convergence steps, after scaling G by a bound on λ_max.
 */
interface NsSchedule {
  quintic: number;
  cubic: number;
  scale: 'frobenius' | 'rowsum';
}
/**
 * A first pass (and the only pass between power iterations): 6 quintic + 1 cubic steps take
 * σ ∈ [1e-3, 1] to within ~[0.9, 1.1] (27 k×k products).
 */
const NS_FIRST: NsSchedule = { quintic: 6, cubic: 1, scale: 'frobenius' };
/**
 * A second pass (G ≈ I, up to directions that the first pass's ridge under-normalized): 3 quintic
 * + 4 cubic steps (24 k×k products); measured equal to a full 6 + 4 schedule on ill-conditioned
 * sketches, and better than cubic steps alone.
 */
const NS_SECOND: NsSchedule = { quintic: 3, cubic: 4, scale: 'rowsum' };

/**
 * W ≈ c^(-1/2)·(G/c + δI)^(-1/2) for a symmetric positive semi-definite Gram matrix G [k, k], on the
 * tfjs backend, by the coupled Newton–Schulz iteration written on the Gram matrix: M ← M·P(M)²,
 * W ← W·P(M), with P the quintic (Muon) polynomial for the schedule's `quintic` steps, then the
 * cubic (3I − M)/2 (Higham, Functions of Matrices, §6.7 and §8.3). All iterates are polynomials in
 * G, so they commute. The scale c bounds λ_max(G): ‖G‖_F (`frobenius`) or the max absolute row sum
 * (`rowsum`, tight when G ≈ I). Cost: 4 (quintic) or 3 (cubic) k×k products per step.
 */
function newtonSchulzInvSqrt(G: tf.Tensor2D, sch: NsSchedule, mm: MatmulFn = matmul): tf.Tensor2D {
  return tf.tidy(() => {
    const k = G.shape[0];
    const I = tf.eye(k) as tf.Tensor2D;
    const c = sch.scale === 'frobenius' ? tf.sqrt(tf.sum(tf.square(G))) : tf.max(tf.sum(tf.abs(G), 1));
    const cs = tf.maximum(c, 1e-30);
    let M = tf.add(tf.div(G, cs), tf.mul(I, NS_RIDGE)) as tf.Tensor2D;
    let W = tf.mul(I, tf.rsqrt(cs)) as tf.Tensor2D;
    const [a, b, cc] = NS_QUINTIC;
    const aI = tf.mul(I, a);
    const halfI = tf.mul(I, 1.5);
    for (let i = 0; i < sch.quintic + sch.cubic; i++) {
      const P =
        i < sch.quintic
          ? (tf.add(tf.add(aI, tf.mul(M, b)), tf.mul(mm(M, M, false, false), cc)) as tf.Tensor2D)
          : (tf.sub(halfI, tf.mul(M, 0.5)) as tf.Tensor2D);
      W = mm(W, P, false, false);
      M = mm(mm(M, P, false, false), P, false, false);
    }
    return W;
  });
}

/**
 * Orthonormal basis of the column space of Y [m, k] computed entirely on the tfjs backend (no host
 * round-trip): each pass forms G = YᵀY, W ≈ G^(-1/2) by Newton–Schulz ({@link newtonSchulzInvSqrt};
 * first pass 6 quintic + 1 cubic steps on G/‖G‖_F + 1e-6·I, second pass 3 quintic + 4 cubic steps
 * on G/max row sum), and Q = Y·W. Two passes give float32 orthogonality (like Cholesky-QR2); one
 * pass (as between power iterations) leaves singular values within ~[0.9, 1.1]. Directions of Y
 * weaker than ~1e-3 of its largest singular value come out as columns of small norm instead of
 * being dropped, so Q is [m, k] always. Cost per pass: two [m, k]-by-k products and 24–27 k×k
 * products. `mm` computes the products (default {@link matmul}). Does not dispose Y.
 */
export function orthonormalizeDevice(Y: tf.Tensor2D, passes = 2, mm: MatmulFn = matmul): tf.Tensor2D {
  checkPasses(passes);
  let Q = Y;
  try {
    for (let p = 0; p < passes; p++) {
      const next = tf.tidy(() => mm(Q, deviceGramFactor(mm(Q, Q, true, false), p, mm), false, false));
      if (Q !== Y) Q.dispose();
      Q = next;
    }
  } catch (e) {
    if (Q !== Y) Q.dispose();
    throw e;
  }
  return Q === Y ? tf.clone(Y) : Q;
}

/**
 * True when the device factorizations of k×k Gram matrices run as the blocked WGSL Cholesky and
 * inverse ({@link gramCholInverseWgsl}, k/32 + 1 dispatches): on webgpu, for k ≤ {@link GRAM_CHOL_MAX}. Elsewhere
 * (webgl, tensorflow) they are Newton–Schulz iterations of tfjs ops.
 */
export function deviceCholesky(k: number): boolean {
  return isWebGpuBackend() && k <= GRAM_CHOL_MAX;
}

/**
 * Device factor W of a Gram matrix G = SᵀS (pass `pass` of an orthonormalization), with S·W
 * orthonormal: W = R⁻¹ of a shifted Cholesky factorization by the blocked WGSL kernel on webgpu (see
 * {@link deviceCholesky}; one pass leaves S·W orthonormal to ~1e-3 on a Gram matrix of condition
 * 1e4, a second pass to float32 rounding), else W ≈ G^(-1/2) by Newton–Schulz.
 */
function deviceGramFactor(G: tf.Tensor2D, pass: number, mm: MatmulFn = matmul): tf.Tensor2D {
  if (deviceCholesky(G.shape[0])) return gramCholInverseWgsl(G);
  return newtonSchulzInvSqrt(G, pass === 0 ? NS_FIRST : NS_SECOND, mm);
}

/** Host copies of recent test matrices (key rows×cols@seed): compressing many groups of one shape reuses one Ω. */
const gaussianMemo: { key: string; data: Float32Array }[] = [];
const GAUSSIAN_MEMO_ENTRIES = 2;

function gaussianData(rows: number, cols: number, seed: number): Float32Array {
  const key = `${rows}x${cols}@${Math.trunc(seed)}`;
  const hit = gaussianMemo.find((e) => e.key === key);
  if (hit) return hit.data;
  const uniform = mulberry32((Math.trunc(seed) ^ 0x9e3779b9) >>> 0);
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < out.length; i += 2) {
    const [a, b] = normalPair(1 - uniform(), uniform());
    out[i] = a;
    if (i + 1 < out.length) out[i + 1] = b;
  }
  gaussianMemo.push({ key, data: out });
  if (gaussianMemo.length > GAUSSIAN_MEMO_ENTRIES) gaussianMemo.shift();
  return out;
}

/**
 * A [rows, cols] float32 matrix of standard normal draws made on the host from `seed` (mulberry32
 * + Box–Muller), so that it is the same on every backend and for every seed. (tfjs's
 * `randomNormal` treats seed 0 as "no seed" and draws from Math.random.) The last two matrices
 * drawn are kept on the host, so repeated calls with the same arguments cost only the upload.
 */
export function gaussianMatrix(rows: number, cols: number, seed: number): tf.Tensor2D {
  const data = gaussianData(rows, cols, seed);
  // The cpu backend keeps the array it is given (and hands it out from dataSync): give it a copy.
  return tf.tensor2d(tf.getBackend() === 'cpu' ? data.slice() : data, [rows, cols]);
}

/** Largest rank at which `oversample: 'auto'` oversamples (see {@link autoOversample}). */
export const AUTO_OVERSAMPLE_MAX_RANK = 128;
/** Default power iterations q of {@link truncatedSvd}. */
export const DEFAULT_POWER_ITERS = 1;

/**
 * The oversampling p that `oversample: 'auto'` uses at rank r: 8 for r ≤ 128, else 0. Measured
 * (packages/xkv/README.md, "SVD defaults"): at r = 64 on real caches p = 8 halves the error excess
 * over the optimum (≈ 10% → 4–6%) for a k×k host eigen-decomposition of a few ms; at r = 512 it
 * gains < 0.5% while the k = 520 host eigen-decomposition costs about one large product on wasm
 * and all of the budget on a GPU.
 */
export function autoOversample(rank: number): number {
  return rank <= AUTO_OVERSAMPLE_MAX_RANK ? 8 : 0;
}

/** Oversampling p of {@link truncatedSvd} at rank r for an `oversample` option (`auto` or absent: {@link autoOversample}). */
export function oversampleOf(rank: number, oversample?: number | 'auto'): number {
  return oversample === undefined || oversample === 'auto' ? autoOversample(rank) : oversample;
}

/** Options of {@link truncatedSvd}. */
export interface TruncatedSvdOptions {
  /** Target rank r (1 ≤ r ≤ min(T, F)). */
  rank: number;
  /**
   * Extra sketch columns p (Halko et al. 2011, §4.2), k = r + p, or `auto` (default:
   * {@link autoOversample}, 8 for r ≤ 128 and 0 above). With p = 0 the sketch's basis is the result
   * (no k×k eigen-decomposition; `singularValues` is then absent). At most {@link MAX_OVERSAMPLE}
   * = 4,096: the k×k host work grows as k³ (Halko et al. recommend p = 5–10).
   */
  oversample?: number | 'auto';
  /**
   * Power (subspace) iterations q (Halko et al. 2011, Alg. 4.4), a multiple of 0.5. The method
   * makes 2q + 2 products with X or Xᵀ (each a [T, F]-by-k product): q = 0 is X·Ω then Qᵀ·X; each
   * half iteration adds one product and raises the spectral decay the sketch sees by one power of
   * σ. A half-integer q starts from the row space (Ω'ᵀ·X, then X·P, …), which is cheaper when
   * F < T. Each intermediate sketch is re-orthonormalized. Default 1; at most
   * {@link MAX_POWER_ITERS} = 16 (Halko et al. use 1–3; beyond ~10 float32 rounding, not the
   * spectrum, limits the error, while each iteration costs two more products with X).
   */
  powerIters?: number;
  /** Seed of the test matrix Ω (drawn on the host, so identical on every backend); an int32. */
  seed?: number;
  /**
   * The test matrix Ω: `gaussian` (default) or `sparse-sign`, {@link SPARSE_SIGN_NONZEROS} = 8 entries
   * ±1 per row (Tropp et al. 2019, §3.3; Martinsson & Tropp 2020, §9.2), with the same error in
   * practice. On webgpu the first sketch (X·Ω, or Ω'ᵀ·X for a half-integer q) is then a gather kernel
   * instead of a [T, F]-by-k product: one of the 2q + 2 products almost free; elsewhere Ω is
   * multiplied densely.
   */
  sketch?: Sketch;
  /** Force an exact decomposition: the sketch covers min(T, F). */
  exact?: boolean;
  /** Where the k×k orthonormalization runs; default `auto` (see {@link Orthogonalization}). */
  orthogonalization?: Orthogonalization;
  /**
   * The matrix product op(a)·op(b) used for every backend product of the method (the products with X
   * and the k×k work); default {@link matmul}. A caller may pass a faster kernel for its backend (the
   * xKV compression passes a tiled WGSL GEMM on webgpu).
   */
  matmul?: MatmulFn;
}

/** The test matrix of {@link truncatedSvd}'s range finder. */
export type Sketch = 'gaussian' | 'sparse-sign';

/** A matrix product op(a)·op(b) → [M, N], as {@link matmul}. */
export type MatmulFn = (a: tf.Tensor2D, b: tf.Tensor2D, transposeA: boolean, transposeB: boolean) => tf.Tensor2D;

/** Rank-r factors X ≈ basis · coeffs, with orthonormal basis columns. */
export interface LowRankFactors {
  /** Orthonormal token basis U_r, [T, r]. */
  basis: tf.Tensor2D;
  /** Coefficients S_r·V_rᵀ (or Qᵀ·X when the final eigen-decomposition is skipped), [r, F]. */
  coeffs: tf.Tensor2D;
  /**
   * The r leading singular values (float64 estimates), in descending order. Absent when the
   * randomized path skips the final k×k eigen-decomposition (oversample 0): basis·coeffs is then
   * the same rank-r approximation, with basis columns in no particular order.
   */
  singularValues?: Float64Array;
}

/** {@link LowRankFactors} of a matrix given as column blocks: one coefficient block [r, F_i] per block X_i. */
export interface LowRankBlockFactors extends Omit<LowRankFactors, 'coeffs'> {
  coeffs: tf.Tensor2D[];
}

/** Column blocks [X_1 … X_G] of X [T, F] (X_i [T, F_i]), or of a right-hand matrix's rows [M_1; …; M_G]. */
type Blocks = tf.Tensor2D[];

/**
 * Σ_i A_i·B_i: a product over blocked inner dimension (A = [A_1 … A_G], B = [B_1; …; B_G]), summed as
 * it goes, so at most two partial products are alive at once.
 */
function blockSum(A: Blocks, B: Blocks, transposeA = false, transposeB = false, mm: MatmulFn = matmul): tf.Tensor2D {
  if (A.length > 1 && !isHostBackend()) {
    // On a GPU every kernel is a dispatch: the partial products, then one addN.
    const parts: tf.Tensor2D[] = [];
    try {
      for (const [i, a] of A.entries()) parts.push(mm(a, B[i], transposeA, transposeB));
      return tf.addN(parts) as tf.Tensor2D;
    } finally {
      tf.dispose(parts);
    }
  }
  let acc = mm(A[0], B[0], transposeA, transposeB);
  try {
    for (let i = 1; i < A.length; i++) {
      const next = tf.tidy(() => tf.add(acc, mm(A[i], B[i], transposeA, transposeB)) as tf.Tensor2D);
      acc.dispose();
      acc = next;
    }
  } catch (e) {
    acc.dispose();
    throw e;
  }
  return acc;
}

/** f applied to each block, as a new block list; when one call throws, the blocks made so far are freed. */
function blockwise(X: Blocks, f: (x: tf.Tensor2D) => tf.Tensor2D): Blocks {
  const out: Blocks = [];
  try {
    for (const x of X) out.push(f(x));
    return out;
  } catch (e) {
    tf.dispose(out);
    throw e;
  }
}

/** [op(Z_1)·W … op(Z_G)·W]: a right product applied block by block. */
function rightTimes(Z: Blocks, W: tf.Tensor2D, transposeZ: boolean, mm: MatmulFn): Blocks {
  return blockwise(Z, (z) => mm(z, W, transposeZ, false));
}

/** [L·X_1 … L·X_G]: a left product applied block by block. */
function leftTimes(L: tf.Tensor2D, X: Blocks, transposeL = false, mm: MatmulFn = matmul): Blocks {
  return blockwise(X, (x) => mm(L, x, transposeL, false));
}

/**
 * Truncated SVD of X [T, F] by the randomized range finder with power iterations (Halko, Martinsson
 * & Tropp 2011, Alg. 4.4 + 5.1): Y = X·Ω, Q = orth(Y), and q times Z = orth(Xᵀ·Q), Q = orth(X·Z);
 * then B = Qᵀ·X. With oversample p > 0 the k×k B·Bᵀ = W Λ Wᵀ is decomposed on the host in float64
 * and basis = Q·W_r, coeffs = W_rᵀ·B; with p = 0, basis = Q and coeffs = B (the same rank-k
 * approximation Q·Qᵀ·X, as `torch.svd_lowrank` returns at q = rank). The large products run on the
 * tfjs backend; the orthonormalizations run on the host (Cholesky-QR in float64) or on the device
 * (Newton–Schulz), see {@link Orthogonalization}. When k ≥ min(T, F) the result is the exact
 * truncated SVD (up to float32 rounding).
 *
 * X may be given as column blocks [X_1 … X_G] (X_i [T, F_i], e.g. the G layers of an xKV group):
 * they are never concatenated — X·M = Σ X_i·M_i, Qᵀ·X = [Qᵀ·X_1 … Qᵀ·X_G] — and the coefficients
 * come back as one block [r, F_i] per X_i. The Gaussian Ω is the same as for the concatenated
 * matrix, so both forms give the same factors up to float32 rounding.
 *
 * Cost: 2q + 2 products of X ([T, F]) with k-column matrices, plus O((T + F)·k²) for the
 * orthonormalizations, plus k³ host work per host orthonormalization and for p > 0.
 * @throws KvpackError('rank') when rank is not an integer in [1, min(T, F)]; KvpackError('config')
 *         for a sketch other than 'gaussian' or 'sparse-sign';
 *         KvpackError('config') for an oversample that is not an integer in [0, MAX_OVERSAMPLE = 4096],
 *         powerIters not a multiple of 0.5 in [0, MAX_POWER_ITERS = 16], or a seed outside the
 *         int32 range; KvpackError('shape') for blocks of different row counts.
 */
export async function truncatedSvd(X: tf.Tensor2D, opts: TruncatedSvdOptions): Promise<LowRankFactors>;
export async function truncatedSvd(X: tf.Tensor2D[], opts: TruncatedSvdOptions): Promise<LowRankBlockFactors>;
export async function truncatedSvd(X: tf.Tensor2D | tf.Tensor2D[], opts: TruncatedSvdOptions): Promise<LowRankFactors | LowRankBlockFactors> {
  const blocks = Array.isArray(X) ? X : [X];
  const [f] = await truncatedSvdBatch([{ blocks, rank: opts.rank }], opts);
  return Array.isArray(X) ? f : { ...f, coeffs: f.coeffs[0] };
}

/** One matrix of {@link truncatedSvdBatch}: its column blocks X_i [T, F_i] and its target rank. */
export interface SvdBatchItem {
  blocks: tf.Tensor2D[];
  rank: number;
}

/**
 * {@link truncatedSvd} of several matrices with shared options (e.g. the keys and the values of one
 * xKV group, ranks r_K·G and r_V·G); result i is that of `truncatedSvd(items[i].blocks, { ...opts,
 * rank: items[i].rank })`, bit for bit. Their range finders run in lockstep, so each
 * orthonormalization factors all their Gram matrices at once: on webgpu one batch of the WGSL
 * Cholesky ({@link gramCholInverseWgslBatch}, sizes may differ: ⌈max k/32⌉ + 1 steps instead of the
 * sum over the matrices) instead of one per matrix. Does not dispose the items.
 * @throws as {@link truncatedSvd}.
 */
export async function truncatedSvdBatch(items: SvdBatchItem[], opts: Omit<TruncatedSvdOptions, 'rank'>): Promise<LowRankBlockFactors[]> {
  for (const { blocks } of items)
    check(blocks.length >= 1 && blocks.every((x) => x.rank === 2 && x.shape[0] === blocks[0].shape[0]), 'shape', () => `truncatedSvd: column blocks must be 2-D with equal row counts, got ${blocks.map((x) => `[${x.shape}]`).join(', ')}`);
  if (!isHostBackend() && !opts.exact && items.some((it) => it.blocks.length > 1)) {
    // On a GPU each block product is one more dispatch (and dispatches, not flops, dominate the
    // k×k work): factor the concatenated matrix (one copy of X), then split the coefficients. Ω is
    // the same either way (drawn for the whole F).
    const wholes = items.map(({ blocks: X }) => (X.length > 1 ? (tf.concat(X, 1) as tf.Tensor2D) : X[0]));
    try {
      const fs = await truncatedSvdBatch(
        wholes.map((w, i) => ({ blocks: [w], rank: items[i].rank })),
        opts,
      );
      const split: LowRankBlockFactors[] = [];
      try {
        for (const [i, f] of fs.entries()) split.push({ ...f, coeffs: splitColumns(f.coeffs[0], items[i].blocks) });
        return split;
      } catch (e) {
        for (const f of [...split, ...fs.slice(split.length)]) tf.dispose([f.basis, ...f.coeffs]);
        throw e;
      }
    } finally {
      wholes.forEach((w, i) => w !== items[i].blocks[0] && w.dispose());
    }
  }
  const qIn = opts.powerIters ?? DEFAULT_POWER_ITERS;
  check(Number.isInteger(2 * qIn) && qIn >= 0, 'config', `powerIters must be a non-negative multiple of 0.5, got ${qIn}`);
  check(qIn <= MAX_POWER_ITERS, 'config', `powerIters ${qIn} is too large: it must be at most ${MAX_POWER_ITERS} (each iteration is two more products with the whole matrix)`);
  const seed = opts.seed ?? 0;
  check(Number.isInteger(seed) && seed >= MIN_SEED && seed <= MAX_SEED, 'config', `seed must be an integer in [${MIN_SEED}, ${MAX_SEED}] (the int32 range), got ${seed}`);
  const orth = resolveOrthogonalization(opts.orthogonalization);
  const sketch = opts.sketch ?? 'gaussian';
  check(sketch === 'gaussian' || sketch === 'sparse-sign', 'config', `sketch must be 'gaussian' or 'sparse-sign', got ${String(sketch)}`);
  const mm = opts.matmul ?? matmul;
  const shapes = items.map(({ blocks: X, rank: r }) => {
    const p = oversampleOf(r, opts.oversample);
    check(Number.isInteger(p) && p >= 0, 'config', `oversample must be a non-negative integer or 'auto', got ${p}`);
    check(p <= MAX_OVERSAMPLE, 'config', `oversample ${p} is too large: it must be at most ${MAX_OVERSAMPLE} (the k×k host work grows as (rank + oversample)³)`);
    const T = X[0].shape[0];
    const F = X.reduce((a, x) => a + x.shape[1], 0);
    const m = Math.min(T, F);
    check(Number.isInteger(r) && r >= 1 && r <= m, 'rank', `rank ${r} is out of range: it must be an integer in [1, min(T=${T}, features=${F}) = ${m}]`);
    return { T, F, m, r, k: opts.exact ? m : Math.min(m, r + p) };
  });
  const out: (LowRankBlockFactors | undefined)[] = new Array(items.length);
  try {
    await factorItems(
      items.map((it) => it.blocks),
      shapes,
      out,
      { qIn, seed, sketch, orth, mm },
    );
  } catch (e) {
    // Results already made are freed: a failing batch leaves nothing behind.
    for (const f of out) if (f) tf.dispose([f.basis, ...f.coeffs]);
    throw e;
  }
  return out as LowRankBlockFactors[];
}

async function factorItems(
  items: Blocks[],
  shapes: { T: number; F: number; m: number; r: number; k: number }[],
  out: (LowRankBlockFactors | undefined)[],
  o: { qIn: number; seed: number; sketch: Sketch; orth: 'host' | 'device'; mm: MatmulFn },
): Promise<void> {
  const { qIn, seed, sketch, orth, mm } = o;
  // Items whose sketch covers min(T, F) are decomposed exactly, one by one; the others by range
  // finders in lockstep.
  const sketched: number[] = [];
  for (const [i, X] of items.entries()) {
    const { T, F, m, r, k } = shapes[i];
    if (k >= m && T > F) {
      // Exact path (small matrices): the F×F Gram needs X whole.
      const whole = X.length === 1 ? X[0] : (tf.concat(X, 1) as tf.Tensor2D);
      let f: LowRankFactors;
      try {
        f = await exactTallSvd(whole, r);
      } finally {
        if (whole !== X[0]) whole.dispose();
      }
      out[i] = { ...f, coeffs: splitColumns(f.coeffs, X) };
    } else if (k >= m) {
      // T ≤ F: the range of X is all of R^T.
      out[i] = await rayleighRitz(tf.eye(T) as tf.Tensor2D, X.map((x) => tf.clone(x)), r);
    } else sketched.push(i);
  }
  // Sketch widths the WGSL Cholesky takes and those it does not are factored differently: apart.
  for (const part of [sketched.filter((i) => deviceCholesky(shapes[i].k)), sketched.filter((i) => !deviceCholesky(shapes[i].k))]) {
    if (!part.length) continue;
    const found = await rangeFinder(
      part.map((i) => items[i]),
      part.map((i) => shapes[i].k),
      Math.round(2 * qIn),
      seed,
      sketch,
      orth,
      mm,
    );
    for (const [j, i] of part.entries()) {
      const { Q, B } = found[j];
      const r = shapes[i].r;
      try {
        out[i] = B[0].shape[0] === r ? { basis: Q, coeffs: B } : await rayleighRitz(Q, B, r, mm);
      } catch (e) {
        // rayleighRitz freed its own Q and B; the items after it are freed here.
        for (const f of found.slice(j + 1)) tf.dispose([f.Q, ...f.B]);
        throw e;
      }
    }
  }
}

/** Splits C [r, Σ F_i] into blocks [r, F_i] shaped like X's blocks; disposes C (unless one block). */
function splitColumns(C: tf.Tensor2D, X: Blocks): Blocks {
  if (X.length === 1) return [C];
  const parts = tf.split(C, X.map((x) => x.shape[1]), 1) as tf.Tensor2D[];
  C.dispose();
  return parts;
}

/**
 * Ω [F, k] drawn for the whole F (so blocks and the concatenated matrix see the same Ω), uploaded as
 * row blocks [F_i, k]: Gaussian, or a sparse sign matrix written out densely.
 */
function testRowBlocks(X: Blocks, k: number, seed: number, sketch: Sketch): Blocks {
  const F = X.reduce((a, x) => a + x.shape[1], 0);
  if (X.length === 1 && sketch === 'gaussian') return [gaussianMatrix(F, k, seed)];
  const data = sketch === 'gaussian' ? gaussianData(F, k, seed) : sparseSignDense(sparseSignMatrix(F, k, seed));
  let off = 0;
  return X.map((x) => {
    const rows = x.shape[1];
    const t = tf.tensor2d(data.slice(off * k, (off + rows) * k), [rows, k]);
    off += rows;
    return t;
  });
}

/** Ω'ᵀ [k, T] of the row-space first sketch Ω'ᵀ·X (Ω' [T, k] Gaussian or sparse sign). */
function testRowsMatrix(k: number, T: number, seed: number, sketch: Sketch): tf.Tensor2D {
  if (sketch === 'gaussian') return gaussianMatrix(k, T, seed);
  const d = sparseSignDense(sparseSignMatrix(T, k, seed));
  const t = new Float32Array(k * T);
  for (let r = 0; r < T; r++) for (let j = 0; j < k; j++) t[j * T + r] = d[r * k + j];
  return tf.tensor2d(t, [k, T]);
}

/** A right operand M [F, k] of the range finder (Ω, or a basis P), applied as A·M to column blocks A. */
interface ColumnOperand {
  times(A: Blocks): tf.Tensor2D;
  dispose(): void;
}

/**
 * Orthonormal Q [T, k'] whose range approximates X's dominant left singular subspace, and
 * B = Qᵀ·X [k', F] (as column blocks like X's), with 2 + `halfSteps` products of X (with an odd
 * number of half steps the first sketch is of the row space, Ω'ᵀ·X); for each X of `Xs`, in lockstep,
 * so that every orthonormalization factors the Gram matrices of all of them in one call.
 *
 * No [T, k] Gram matrix is formed: a column sketch Y = X·M (M = Ω, or an orthonormal P [F, k]) is
 * always followed by the product A = Yᵀ·X [k, F], and YᵀY = A·M is a [k, F]·[F, k] product. With W
 * the factor of YᵀY (Q = Y·W orthonormal), A becomes the next row sketch Zᵀ = Wᵀ·A, or, for the
 * last sketch, B = Wᵀ·A. A row sketch Zᵀ [k, F] is normalized on the F side: P = Z·W_Z, then
 * Y = X·P. The last column sketch gets one pass when it follows a power iteration (Y = X·P is
 * then well conditioned) and two (Cholesky-QR2-like) when it is the raw X·Ω. Every F-side matrix
 * (M, A, Zᵀ, B) is kept as blocks matching X's.
 */
async function rangeFinder(Xs: Blocks[], ks: number[], halfSteps: number, seed: number, sketch: Sketch, orth: 'host' | 'device', mm: MatmulFn = matmul): Promise<{ Q: tf.Tensor2D; B: Blocks }[]> {
  // Every tensor made here is recorded, so that a failure part way (a product or a factorization
  // that throws) frees what is still alive; on success the results are returned, the rest disposed.
  const made: tf.Tensor[] = [];
  const own = <T extends tf.Tensor | tf.Tensor[] | tf.Tensor[][]>(x: T): T => {
    made.push(...([x] as unknown[]).flat(2) as tf.Tensor[]);
    return x;
  };
  try {
    return await rangeFinderSteps(Xs, ks, halfSteps, seed, sketch, orth, mm, own);
  } catch (e) {
    for (const t of made) if (!t.isDisposed) t.dispose();
    throw e;
  }
}

async function rangeFinderSteps(
  Xs: Blocks[],
  ks: number[],
  halfSteps: number,
  seed: number,
  sketch: Sketch,
  orth: 'host' | 'device',
  mm: MatmulFn,
  own: <T extends tf.Tensor | tf.Tensor[] | tf.Tensor[][]>(x: T) => T,
): Promise<{ Q: tf.Tensor2D; B: Blocks }[]> {
  // The WGSL Cholesky reads (G + Gᵀ)/2 itself, and factors a batch in the same dispatches.
  const chol = orth === 'device' && deviceCholesky(Math.max(...ks));
  const factorAll = async (Gs: tf.Tensor2D[], pass: number): Promise<tf.Tensor2D[]> => {
    if (orth === 'host') {
      const rs = await Promise.allSettled(Gs.map((G) => hostGramFactor(G)));
      const failed = rs.find((x) => x.status === 'rejected');
      if (failed) {
        for (const x of rs) if (x.status === 'fulfilled') x.value.dispose();
        throw failed.reason;
      }
      return own(rs.map((x) => (x as PromiseFulfilledResult<tf.Tensor2D>).value));
    }
    if (chol) return own(gramCholInverseWgslBatch(Gs));
    return Gs.map((G) => own(deviceGramFactor(G, pass, mm)));
  };
  const gramOf = (A: Blocks, M: ColumnOperand): tf.Tensor2D =>
    own(tf.tidy(() => {
      const G = M.times(A);
      return chol ? G : (tf.mul(tf.add(G, tf.transpose(G)), 0.5) as tf.Tensor2D);
    }));
  const dense = (blocks: Blocks): ColumnOperand => (own(blocks), { times: (A) => own(blockSum(A, blocks, false, false, mm)), dispose: () => tf.dispose(blocks) });
  const testOperand = (X: Blocks, k: number): ColumnOperand => {
    if (sketch === 'sparse-sign' && isWebGpuBackend() && X.length === 1) {
      // Gathers instead of a dense product with a mostly-zero Ω.
      const s = sparseSignMatrix(X[0].shape[1], k, seed);
      const ptr = own(tf.tensor1d(s.ptr, 'int32'));
      const entries = own(tf.tensor1d(s.entries, 'int32'));
      return { times: (A) => own(sparseSignProductWgsl(A[0], s, ptr, entries)), dispose: () => tf.dispose([ptr, entries]) };
    }
    return dense(testRowBlocks(X, k, seed, sketch));
  };
  const columnSketches = (M: ColumnOperand[]) => Xs.map((X, i) => M[i].times(X));
  const disposeAll = (M: ColumnOperand[]) => M.forEach((m) => m.dispose());
  let M: ColumnOperand[]; // Y = X·M
  let Y: tf.Tensor2D[];
  let steps = halfSteps;
  if (halfSteps % 2 === 0) {
    M = Xs.map((X, i) => testOperand(X, ks[i]));
    Y = columnSketches(M);
  } else {
    const Zt0 = Xs.map((X, i) => {
      if (sketch === 'sparse-sign' && isWebGpuBackend() && X.length === 1) {
        // Row gathers instead of a dense product with a mostly-zero Ω'.
        const s = sparseSignMatrix(X[0].shape[0], ks[i], seed);
        const ptr = own(tf.tensor1d(s.ptr, 'int32'));
        const entries = own(tf.tensor1d(s.entries, 'int32'));
        const z = [own(sparseSignRowsProductWgsl(X[0], s, ptr, entries))];
        tf.dispose([ptr, entries]);
        return z;
      }
      const omegaT = own(testRowsMatrix(ks[i], X[0].shape[0], seed, sketch));
      const z = own(leftTimes(omegaT, X, false, mm));
      omegaT.dispose();
      return z;
    });
    M = (await rowToColumnBasis(Zt0, factorAll, mm)).map(dense);
    tf.dispose(Zt0.flat());
    Y = columnSketches(M);
    steps -= 1;
  }
  for (;;) {
    const last = steps === 0;
    if (last && orth === 'device' && !chol) {
      // Two passes, then B = Qᵀ·X from the explicit basis: folding Newton–Schulz factors into Yᵀ·X
      // loses ~1e-3 of B in float32 when Y is ill conditioned.
      disposeAll(M);
      return Xs.map((X, i) => {
        const Q = own(orthonormalizeDevice(Y[i], 2, mm));
        Y[i].dispose();
        return { Q, B: own(leftTimes(Q, X, true, mm)) };
      });
    }
    // Yᵀ·X [k, F]: a custom product reads Y transposed in place; core matmul gets one explicit Yᵀ.
    const A = Xs.map((X, i) => {
      if (mm !== matmul) return own(leftTimes(Y[i], X, true, mm));
      const Yt = own(tf.transpose(Y[i]) as tf.Tensor2D);
      const a = own(leftTimes(Yt, X));
      Yt.dispose();
      return a;
    });
    const G = A.map((a, i) => gramOf(a, M[i])); // = YᵀY
    disposeAll(M);
    const W = await factorAll(G, 0);
    tf.dispose(G);
    if (last) {
      let Q = Y.map((y, i) => own(mm(y, W[i], false, false)));
      let B = A.map((a, i) => own(leftTimes(W[i], a, true, mm)));
      tf.dispose([...Y, ...W, ...A.flat()]);
      if (halfSteps === 0 || chol) {
        // Second pass (Cholesky-QR2) on the raw sketch X·Ω, which can be too ill-conditioned for one
        // pass in float32, and after a float32 (device) Cholesky of the first pass's F-side Gram.
        const G2 = Q.map((q) => own(mm(q, q, true, false)));
        const W2 = await factorAll(G2, 1);
        const Q2 = Q.map((q, i) => own(mm(q, W2[i], false, false)));
        const B2 = B.map((b, i) => own(leftTimes(W2[i], b, true, mm)));
        tf.dispose([...G2, ...W2, ...Q, ...B.flat()]);
        Q = Q2;
        B = B2;
      }
      return Q.map((q, i) => ({ Q: q, B: B[i] }));
    }
    const Zt = A.map((a, i) => own(leftTimes(W[i], a, true, mm)));
    tf.dispose([...Y, ...W, ...A.flat()]);
    M = (await rowToColumnBasis(Zt, factorAll, mm)).map(dense);
    tf.dispose(Zt.flat());
    Y = columnSketches(M);
    steps -= 2;
  }
}

/** Orthonormal P [F, k'] (as row blocks) spanning the columns of Z = (Zᵀ)ᵀ, from each row sketch Zᵀ [k, F] (column blocks; one pass). */
async function rowToColumnBasis(Zts: Blocks[], factorAll: (Gs: tf.Tensor2D[], pass: number) => Promise<tf.Tensor2D[]>, mm: MatmulFn = matmul): Promise<Blocks[]> {
  // Zᵀ read transposed in place on a GPU (no transposed copies: each is one more dispatch there).
  const Z = isHostBackend() ? Zts.map((Zt) => Zt.map((z) => tf.transpose(z) as tf.Tensor2D)) : null;
  const G: tf.Tensor2D[] = [];
  try {
    for (const [i, Zt] of Zts.entries()) G.push(blockSum(Zt, Z ? Z[i] : Zt, false, !Z, mm));
    const W = await factorAll(G, 0);
    const P: Blocks[] = [];
    try {
      for (const [i, Zt] of Zts.entries()) P.push(rightTimes(Z ? Z[i] : Zt, W[i], !Z, mm));
      return P;
    } catch (e) {
      tf.dispose(P.flat());
      throw e;
    } finally {
      tf.dispose(W);
    }
  } finally {
    tf.dispose([...(Z ? Z.flat() : []), ...G]);
  }
}

/**
 * Rank-r truncation of Q·B (Q [T, k] orthonormal, B [k, F] as column blocks): B·Bᵀ = W Λ Wᵀ on the
 * host in float64, basis = Q·W_r, coeffs = W_rᵀ·B. Zero columns pad a numerically rank-deficient X.
 * Disposes Q and B.
 */
async function rayleighRitz(Q: tf.Tensor2D, B: Blocks, r: number, mm: MatmulFn = matmul): Promise<LowRankBlockFactors> {
  const kk = B[0].shape[0];
  let Wt: tf.Tensor2D | null = null;
  let basis: tf.Tensor2D | null = null;
  try {
    const BBt = blockSum(B, B, false, true, mm);
    let g: Float32Array;
    try {
      g = (await BBt.data()) as Float32Array;
    } finally {
      BBt.dispose();
    }
    const { values, vectors } = symmetricEig(g, kk);
    const rr = Math.min(r, kk);
    const W = new Float32Array(kk * r);
    for (let i = 0; i < kk; i++) for (let j = 0; j < rr; j++) W[i * r + j] = vectors[i * kk + j];
    Wt = tf.tensor2d(W, [kk, r]);
    basis = mm(Q, Wt, false, false);
    const coeffs = leftTimes(Wt, B, true, mm);
    const singularValues = new Float64Array(r);
    for (let j = 0; j < rr; j++) singularValues[j] = Math.sqrt(Math.max(values[j], 0));
    return { basis, coeffs, singularValues };
  } catch (e) {
    basis?.dispose();
    throw e;
  } finally {
    tf.dispose([...(Wt ? [Wt] : []), ...B, Q]);
  }
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
  let g: Float32Array;
  try {
    g = (await G.data()) as Float32Array;
  } finally {
    G.dispose();
  }
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
