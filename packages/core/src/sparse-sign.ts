import * as tf from '@tensorflow/tfjs-core';
import { check } from './errors.js';
import { mulberry32 } from './random.js';
import { runFlatWgsl, wgslFlatIndex } from './webgpu.js';
import { MAX_SEED, MIN_SEED } from './limits.js';

/**
 * Nonzeros per row ζ of a sparse sign test matrix (Tropp, Yurtsever, Udell & Cevher 2019,
 * "Streaming low-rank matrix approximation with an application to scientific simulation", §3.3:
 * ζ = 8 behaves like a Gaussian test matrix in practice, as in Martinsson & Tropp 2020, §9.2).
 */
export const SPARSE_SIGN_NONZEROS = 8;

/**
 * A sparse sign test matrix Ω [n, k]: each row holds min(ζ, k) entries ±1 in distinct columns drawn
 * uniformly (mulberry32 from the seed, the same on every backend), the rest zero. Stored by column for
 * the product X·Ω: column j's entries are `entries[ptr[j] … ptr[j + 1])`, each a row index f (for +1)
 * or its bitwise complement ~f (for −1), in increasing f.
 */
export interface SparseSign {
  rows: number;
  cols: number;
  ptr: Int32Array;
  entries: Int32Array;
}

const memo: { key: string; s: SparseSign }[] = [];

/**
 * The sparse sign matrix [rows, cols] of `seed`. The last two drawn are kept on the host and handed
 * out again: treat the arrays as read-only.
 * @throws KvpackError('shape') for rows or cols that are not positive integers (cols at most 2³¹ / ζ
 *   entries in all); KvpackError('config') for a seed that is not an int32.
 */
export function sparseSignMatrix(rows: number, cols: number, seed: number): SparseSign {
  check(Number.isInteger(rows) && Number.isInteger(cols) && rows >= 1 && cols >= 1 && rows * Math.min(SPARSE_SIGN_NONZEROS, cols) < 2 ** 31, 'shape', `sparse sign matrix: [${rows}, ${cols}] must be positive integers with fewer than 2³¹ entries`);
  check(Number.isInteger(seed) && seed >= MIN_SEED && seed <= MAX_SEED, 'config', `sparse sign matrix: seed must be an int32, got ${seed}`);
  const key = `${rows}x${cols}@${Math.trunc(seed)}`;
  const hit = memo.find((e) => e.key === key);
  if (hit) return hit.s;
  const z = Math.min(SPARSE_SIGN_NONZEROS, cols);
  const uniform = mulberry32((Math.trunc(seed) ^ 0x5bd1e995) >>> 0);
  const rowCols = new Int32Array(rows * z);
  const rowSign = new Uint8Array(rows * z);
  const count = new Int32Array(cols + 1);
  for (let f = 0; f < rows; f++) {
    for (let s = 0; s < z; s++) {
      let c: number;
      // Distinct columns within a row (z ≤ 8 draws: a linear scan).
      do c = Math.floor(uniform() * cols);
      while (rowCols.subarray(f * z, f * z + s).includes(c));
      rowCols[f * z + s] = c;
      rowSign[f * z + s] = uniform() < 0.5 ? 1 : 0;
      count[c + 1]++;
    }
  }
  const ptr = new Int32Array(cols + 1);
  for (let j = 0; j < cols; j++) ptr[j + 1] = ptr[j] + count[j + 1];
  const fill = ptr.slice(0, cols);
  const entries = new Int32Array(rows * z);
  // Rows in increasing order, so each column's entries come out sorted by row.
  for (let f = 0; f < rows; f++)
    for (let s = 0; s < z; s++) {
      const c = rowCols[f * z + s];
      entries[fill[c]++] = rowSign[f * z + s] ? ~f : f;
    }
  const out = { rows, cols, ptr, entries };
  memo.push({ key, s: out });
  if (memo.length > 2) memo.shift();
  return out;
}

/** The matrix written out densely, [rows, cols] row-major float32 (host backends multiply with it). */
export function sparseSignDense(s: SparseSign): Float32Array {
  const out = new Float32Array(s.rows * s.cols);
  for (let j = 0; j < s.cols; j++)
    for (let e = s.ptr[j]; e < s.ptr[j + 1]; e++) {
      const v = s.entries[e];
      out[(v >= 0 ? v : ~v) * s.cols + j] = v >= 0 ? 1 : -1;
    }
  return out;
}

/** The flat invocation index as a u32 (the kernels' grid is {@link runFlatWgsl}'s). */
const FLAT = `${wgslFlatIndex('fi')}\n  let flat = u32(fi);`;

/** Rows of X each invocation of {@link sparseSignProductWgsl} sums (one decoded entry serves all of them). */
const ROWS_PER_INVOCATION = 4;

/**
 * X·Ω [M, k] for X [M, n] float32 and a sparse sign Ω [n, k] on the webgpu backend: per output column
 * j, the signed sum of the columns of X that Ω's column j selects (about ζ·n/k of them), for four rows
 * per invocation. Reads X ζ times over instead of k times: for the range finder's first sketch
 * ([32768, 4096]·[4096, 512]) that is a gather-bound kernel instead of a 137 GFLOP product. `ptr` and
 * `entries` are Ω's columns ({@link SparseSign}) as int32 tensors. Disposes no input.
 * @throws KvpackError('dtype') for X not a float32 matrix or index tensors not int32;
 *   KvpackError('shape') when X's columns are not Ω's rows.
 */
export function sparseSignProductWgsl(X: tf.Tensor2D, s: SparseSign, ptr: tf.Tensor1D, entries: tf.Tensor1D): tf.Tensor2D {
  const [M] = X.shape;
  return runSparseSign('sparse_sign_product', X, 1, s, ptr, entries, [M, s.cols], Math.ceil(M / ROWS_PER_INVOCATION) * s.cols, `
fn kernel(index: i32) {
  let M = u32(uniforms.xShape.x);
  let n = u32(uniforms.xShape.y);
  let k = u32(uniforms.outShape.y);
  ${FLAT}
  if (flat >= ((M + ${ROWS_PER_INVOCATION - 1}u) / ${ROWS_PER_INVOCATION}u) * k) { return; }
  // Neighbouring invocations take neighbouring columns of the same rows (their gathers share rows of X).
  let j = flat % k;
  let t0 = (flat / k) * ${ROWS_PER_INVOCATION}u;
  let last = (M - 1u) * n;
${signedSum('f', 'o = t0 * n + f', 'X[o], X[min(o + n, last + f)], X[min(o + 2u * n, last + f)], X[min(o + 3u * n, last + f)]')}
  for (var q = 0u; q < ${ROWS_PER_INVOCATION}u; q++) {
    if (t0 + q < M) { result[(t0 + q) * k + j] = acc[q]; }
  }
}`);
}


/**
 * Ωᵀ·X [k, F] for X [T, F] float32 and a sparse sign Ω [T, k] on the webgpu backend (the row-space
 * first sketch of a half-integer q): row j is the signed sum of the rows of X that Ω's column j
 * selects (about ζ·T/k of them), four columns of X per invocation, read along X's rows. Disposes no
 * input.
 * @throws as {@link sparseSignProductWgsl} (X's rows must be Ω's rows).
 */
export function sparseSignRowsProductWgsl(X: tf.Tensor2D, s: SparseSign, ptr: tf.Tensor1D, entries: tf.Tensor1D): tf.Tensor2D {
  const F = X.shape[1];
  return runSparseSign('sparse_sign_rows_product', X, 0, s, ptr, entries, [s.cols, F], Math.ceil(F / 4) * s.cols, `
fn kernel(index: i32) {
  let F = u32(uniforms.xShape.y);
  let k = u32(uniforms.outShape.x);
  let F4 = (F + 3u) / 4u;
  ${FLAT}
  if (flat >= F4 * k) { return; }
  // Neighbouring invocations take neighbouring columns of X (coalesced row reads).
  let j = flat / F4;
  let f0 = (flat % F4) * 4u;
  let last = u32(uniforms.xShape.x) * F - 1u;
${signedSum('t', 'o = t * F + f0', 'X[o], X[min(o + 1u, last)], X[min(o + 2u, last)], X[min(o + 3u, last)]')}
  for (var q = 0u; q < 4u; q++) {
    if (f0 + q < F) { result[j * F + f0 + q] = acc[q]; }
  }
}`);
}

/**
 * WGSL of the signed sum over Ω's column j: for each entry, index `idx` (decoded from the entry), the
 * offset `let <offset>`, and the four values `four` (a vec4 of X) added with the entry's sign into `acc`.
 */
function signedSum(idx: string, offset: string, four: string): string {
  return `  var acc = vec4<f32>(0.0);
  for (var e = u32(ptr[j]); e < u32(ptr[j + 1u]); e++) {
    let v = ent[e];
    let ${idx} = u32(select(~v, v, v >= 0));
    let sg = select(-1.0, 1.0, v >= 0);
    let ${offset};
    acc += sg * vec4<f32>(${four});
  }`;
}

/** Checks the operands (X's dimension `dim` must be Ω's rows) and runs one of the two gather kernels. */
function runSparseSign(key: string, X: tf.Tensor2D, dim: 0 | 1, s: SparseSign, ptr: tf.Tensor1D, entries: tf.Tensor1D, outputShape: [number, number], invocations: number, code: string): tf.Tensor2D {
  check(X.rank === 2 && X.dtype === 'float32' && ptr.dtype === 'int32' && entries.dtype === 'int32', 'dtype', `sparse sign product: X must be a float32 matrix and the columns int32, got X ${X.dtype} [${X.shape}], ${ptr.dtype} / ${entries.dtype}`);
  check(X.shape[dim] === s.rows && ptr.size === s.cols + 1 && entries.size === s.entries.length, 'shape', `sparse sign product: X is [${X.shape}] but the test matrix is [${s.rows}, ${s.cols}]`);
  return runFlatWgsl({
    key,
    names: ['X', 'ptr', 'ent'],
    inputs: [X, ptr, entries],
    outputShape,
    dtype: 'float32',
    invocations,
    code,
  }) as tf.Tensor2D;
}
