/**
 * Small dense float64 linear algebra on the host, on flat Float64Arrays (row-major unless said).
 * These are the k×k decompositions of the randomized SVD (k = rank + oversampling, at most a few
 * hundred to ~1,000): everything larger runs on the tfjs backend.
 *
 * Algorithms: Householder tridiagonalization + implicit QL with Wilkinson shifts (Golub & Van Loan,
 * Matrix Computations, §8.3; the EISPACK tred2/tql2 pair), and Cholesky (GVL §4.2).
 */
import { KvpackError } from './errors.js';

/**
 * Eigen-decomposition of a symmetric n×n matrix `a` (row-major; only its lower triangle is read).
 * Returns eigenvalues in descending order and the eigenvectors as the columns of `vectors`
 * (row-major n×n). Runs in O(n³) with contiguous inner loops (the transform is held transposed).
 */
export function symmetricEigHost(a: ArrayLike<number>, n: number): { values: Float64Array; vectors: Float64Array } {
  // W[j*n + k] holds V[k][j]: column j of the transform V is row j of W (contiguous).
  const W = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) {
    const v = a[i * n + j];
    W[j * n + i] = v; // V[i][j]
    W[i * n + j] = v; // V[j][i]
  }
  const d = new Float64Array(n);
  const e = new Float64Array(n);
  tridiagonalize(W, d, e, n);
  tridiagonalQL(W, d, e, n);
  const order = Array.from({ length: n }, (_, i) => i).sort((x, y) => d[y] - d[x]);
  const values = new Float64Array(n);
  const vectors = new Float64Array(n * n);
  order.forEach((src, j) => {
    values[j] = d[src];
    const row = src * n;
    for (let i = 0; i < n; i++) vectors[i * n + j] = W[row + i];
  });
  return { values, vectors };
}

/** Householder reduction to tridiagonal form, accumulating the transform (EISPACK tred2). */
function tridiagonalize(W: Float64Array, d: Float64Array, e: Float64Array, n: number): void {
  // V[r][c] ≡ W[c*n + r]
  for (let j = 0; j < n; j++) d[j] = W[j * n + n - 1];
  for (let i = n - 1; i > 0; i--) {
    let scale = 0;
    let h = 0;
    for (let k = 0; k < i; k++) scale += Math.abs(d[k]);
    if (scale === 0) {
      e[i] = d[i - 1];
      for (let j = 0; j < i; j++) {
        d[j] = W[j * n + i - 1];
        W[j * n + i] = 0;
        W[i * n + j] = 0;
      }
    } else {
      for (let k = 0; k < i; k++) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      let f = d[i - 1];
      let g = Math.sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (let j = 0; j < i; j++) e[j] = 0;
      for (let j = 0; j < i; j++) {
        const cj = j * n;
        f = d[j];
        W[i * n + j] = f; // V[j][i]
        g = e[j] + W[cj + j] * f;
        for (let k = j + 1; k <= i - 1; k++) {
          const vkj = W[cj + k];
          g += vkj * d[k];
          e[k] += vkj * f;
        }
        e[j] = g;
      }
      f = 0;
      for (let j = 0; j < i; j++) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const hh = f / (h + h);
      for (let j = 0; j < i; j++) e[j] -= hh * d[j];
      for (let j = 0; j < i; j++) {
        const cj = j * n;
        f = d[j];
        g = e[j];
        for (let k = j; k <= i - 1; k++) W[cj + k] -= f * e[k] + g * d[k];
        d[j] = W[cj + i - 1];
        W[cj + i] = 0;
      }
    }
    d[i] = h;
  }
  for (let i = 0; i < n - 1; i++) {
    W[i * n + n - 1] = W[i * n + i];
    W[i * n + i] = 1;
    const h = d[i + 1];
    const ci1 = (i + 1) * n;
    if (h !== 0) {
      for (let k = 0; k <= i; k++) d[k] = W[ci1 + k] / h;
      for (let j = 0; j <= i; j++) {
        const cj = j * n;
        let g = 0;
        for (let k = 0; k <= i; k++) g += W[ci1 + k] * W[cj + k];
        for (let k = 0; k <= i; k++) W[cj + k] -= g * d[k];
      }
    }
    for (let k = 0; k <= i; k++) W[ci1 + k] = 0;
  }
  for (let j = 0; j < n; j++) {
    d[j] = W[j * n + n - 1];
    W[j * n + n - 1] = 0;
  }
  W[(n - 1) * n + n - 1] = 1;
  e[0] = 0;
}

/** Implicit QL iterations on the tridiagonal (d, e), rotating the transform's columns (EISPACK tql2). */
function tridiagonalQL(W: Float64Array, d: Float64Array, e: Float64Array, n: number): void {
  for (let i = 1; i < n; i++) e[i - 1] = e[i];
  e[n - 1] = 0;
  let f = 0;
  let tst1 = 0;
  const eps = 2 ** -52;
  for (let l = 0; l < n; l++) {
    tst1 = Math.max(tst1, Math.abs(d[l]) + Math.abs(e[l]));
    let m = l;
    while (m < n) {
      if (Math.abs(e[m]) <= eps * tst1) break;
      m++;
    }
    if (m === n) m = n - 1;
    if (m > l) {
      let iter = 0;
      do {
        if (++iter > 60) throw new KvpackError('unsupported', `symmetric eigen-decomposition did not converge (n = ${n})`);
        let g = d[l];
        let p = (d[l + 1] - g) / (2 * e[l]);
        let r = Math.sqrt(p * p + 1);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const dl1 = d[l + 1];
        let h = g - d[l];
        for (let i = l + 2; i < n; i++) d[i] -= h;
        f += h;
        p = d[m];
        let c = 1;
        let c2 = c;
        let c3 = c;
        const el1 = e[l + 1];
        let s = 0;
        let s2 = 0;
        for (let i = m - 1; i >= l; i--) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = Math.sqrt(p * p + e[i] * e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          const ci = i * n;
          const ci1 = ci + n;
          for (let k = 0; k < n; k++) {
            const hk = W[ci1 + k];
            const vk = W[ci + k];
            W[ci1 + k] = s * vk + c * hk;
            W[ci + k] = c * vk - s * hk;
          }
        }
        p = (-s * s2 * c3 * el1 * e[l]) / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (Math.abs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0;
  }
}

/**
 * Cholesky factor R (upper triangular, row-major n×n) with G = RᵀR, of a symmetric positive-definite
 * matrix G. Returns null when G is not numerically positive definite (a pivot ≤ tol·max diag).
 * n³/3 multiply-adds; the dot products are unrolled by four (about 2× faster in V8 than one
 * accumulator).
 */
export function choleskyUpper(G: ArrayLike<number>, n: number, tol = 1e-12): Float64Array | null {
  let maxDiag = 0;
  for (let i = 0; i < n; i++) maxDiag = Math.max(maxDiag, G[i * n + i]);
  // Row-oriented: R[i][j] = (G[i][j] − Σ_{k<i} R[k][i] R[k][j]) / R[i][i]; R is upper, so use
  // its transpose L (lower, row-major) for contiguous dot products: L[j][k] = R[k][j].
  const L = new Float64Array(n * n);
  for (let j = 0; j < n; j++) {
    const lj = j * n;
    let s = G[j * n + j];
    for (let k = 0; k < j; k++) s -= L[lj + k] * L[lj + k];
    if (!(s > tol * maxDiag)) return null;
    const djj = Math.sqrt(s);
    L[lj + j] = djj;
    const inv = 1 / djj;
    for (let i = j + 1; i < n; i++) {
      const li = i * n;
      let t0 = 0;
      let t1 = 0;
      let t2 = 0;
      let t3 = 0;
      let k = 0;
      for (; k + 3 < j; k += 4) {
        t0 += L[li + k] * L[lj + k];
        t1 += L[li + k + 1] * L[lj + k + 1];
        t2 += L[li + k + 2] * L[lj + k + 2];
        t3 += L[li + k + 3] * L[lj + k + 3];
      }
      for (; k < j; k++) t0 += L[li + k] * L[lj + k];
      L[li + j] = (G[i * n + j] - (t0 + t1 + (t2 + t3))) * inv;
    }
  }
  const R = new Float64Array(n * n);
  for (let i = 0; i < n; i++) for (let j = i; j < n; j++) R[i * n + j] = L[j * n + i];
  return R;
}

/** Inverse of an upper-triangular n×n matrix (row-major), by back substitution (n³/3 multiply-adds). */
export function invertUpper(R: Float64Array, n: number): Float64Array {
  // Solve R X = I column by column; X is upper triangular too.
  const X = new Float64Array(n * n);
  const col = new Float64Array(n);
  for (let j = 0; j < n; j++) {
    col.fill(0);
    col[j] = 1 / R[j * n + j];
    for (let i = j - 1; i >= 0; i--) {
      const ri = i * n;
      let s0 = 0;
      let s1 = 0;
      let s2 = 0;
      let s3 = 0;
      let k = i + 1;
      for (; k + 3 <= j; k += 4) {
        s0 += R[ri + k] * col[k];
        s1 += R[ri + k + 1] * col[k + 1];
        s2 += R[ri + k + 2] * col[k + 2];
        s3 += R[ri + k + 3] * col[k + 3];
      }
      for (; k <= j; k++) s0 += R[ri + k] * col[k];
      col[i] = -(s0 + s1 + (s2 + s3)) / R[ri + i];
    }
    for (let i = 0; i <= j; i++) X[i * n + j] = col[i];
  }
  return X;
}
