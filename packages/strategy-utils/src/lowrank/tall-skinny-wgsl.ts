import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, isWebGpuBackend, matmul, runWgsl } from '@kvpack/core';

/*
 * Register-tiled float32 GEMM in WGSL for the products of the randomized range finder on the webgpu
 * backend: X·Ω and X·P ([T, F]·[F, k]), Yᵀ·X and Qᵀ·X ([T, k]ᵀ·[T, F], read in place: no transposed copy),
 * the [T, k]ᵀ·[T, k] Gram and the k×k products of the orthonormalization. tfjs-webgpu's generic
 * matMul runs these tall-skinny shapes at ~3 TFLOP/s on an H200 (8.5 on a square 4096³).
 *
 * One workgroup computes a BM×BN tile of C = op(A)·op(B): BK-deep slabs of op(A) [BM, BK] and
 * op(B) [BK, BN] are staged in workgroup memory (k-major, read as vec4), the next slab is prefetched
 * into registers while the current one is multiplied, and each invocation accumulates a TM×TN
 * micro-tile in registers (vec4 accumulators; its rows are strided by 4·BM/TM, its columns by 4·BN/TN,
 * so that neighbouring invocations read neighbouring vec4s). Global loads are scalar and coalesced
 * along the operand's stored row (any M, N, K: edges are zero-filled, odd sizes work).
 *
 * Split-K: when the output has few tiles and the reduction is long (Qᵀ·X: a [k, F] output summed over
 * T = 32K tokens), the K range is cut into S slices, each workgroup writes a partial [S, M, N] and a
 * second pass sums the slices in a fixed order (the result is deterministic).
 */

/** Tile of one workgroup: BM×BN outputs, BK-deep slabs, TM×TN outputs per invocation (multiples of 4). */
export interface GemmTile {
  bm: number;
  bn: number;
  bk: number;
  tm: number;
  tn: number;
}

/** Tiles the benchmark compares; `128x64` is the default. */
export const GEMM_TILES: Record<string, GemmTile> = {
  '128x64': { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4 },
  '128x128': { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8 },
  '64x64': { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 },
  '64x128': { bm: 64, bn: 128, bk: 16, tm: 4, tn: 8 },
};

/** Options of {@link wgslMatmul}. */
export interface WgslMatmulOptions {
  /** Workgroup tile (default {@link GEMM_TILES}['128x64']). */
  tile?: GemmTile;
  /** K slices; default {@link defaultSplitK}. 1 disables split-K. */
  splitK?: number;
}

/** Fewer output tiles than this → split K (about 2 workgroups per SM on a 132-SM H100). */
const TARGET_WORKGROUPS = 256;
/** Smallest reduction length per K slice. */
const MIN_SLICE = 256;

/**
 * K slices for an M×N output with reduction length K: enough to bring the workgroups to about
 * {@link TARGET_WORKGROUPS}, each slice at least {@link MIN_SLICE} long.
 */
export function defaultSplitK(M: number, N: number, K: number, tile: GemmTile = GEMM_TILES['128x64']): number {
  const tiles = Math.ceil(M / tile.bm) * Math.ceil(N / tile.bn);
  if (tiles >= TARGET_WORKGROUPS) return 1;
  return Math.max(1, Math.min(Math.ceil(TARGET_WORKGROUPS / tiles), Math.floor(K / MIN_SLICE), 64));
}

function checkTile(t: GemmTile): number {
  const threads = (t.bm / t.tm) * (t.bn / t.tn);
  const ok =
    [t.bm, t.bn, t.bk, t.tm, t.tn].every((v) => Number.isInteger(v) && v > 0) &&
    t.tm % 4 === 0 &&
    t.tn % 4 === 0 &&
    t.bm % t.tm === 0 &&
    t.bn % t.tn === 0 &&
    Number.isInteger(threads) &&
    threads <= 256 &&
    (t.bm * t.bk) % threads === 0 &&
    (t.bk * t.bn) % threads === 0;
  if (!ok) throw new KvpackError('config', `wgslMatmul: tile ${JSON.stringify(t)} is not valid (TM, TN multiples of 4 dividing BM, BN; at most 256 invocations; slabs divisible by the invocations)`);
  return threads;
}

function gemmCode(M: number, N: number, K: number, kc: number, tA: boolean, tB: boolean, t: GemmTile, threads: number): { code: string; bytes: number } {
  const padA = tA ? 0 : 4; // A stored [M, K] is written k-major with stride BM: pad against bank conflicts
  const padB = tB ? 4 : 0;
  const sa = (t.bm + padA) / 4;
  const sb = (t.bn + padB) / 4;
  const la = (t.bm * t.bk) / threads;
  const lb = (t.bk * t.bn) / threads;
  const ty = t.bm / t.tm;
  const tx = t.bn / t.tn;
  const tm4 = t.tm / 4;
  const tn4 = t.tn / 4;
  // Element e of a slab → (row of op(A) / column of op(B), k), fastest along the stored row.
  const aMap = tA ? `let ml = e % ${t.bm}u; let kl = e / ${t.bm}u;` : `let kl = e % ${t.bk}u; let ml = e / ${t.bk}u;`;
  const aIdx = tA ? 'gk * M + gm' : 'gm * K + gk';
  const bMap = tB ? `let kl = e % ${t.bk}u; let nl = e / ${t.bk}u;` : `let nl = e % ${t.bn}u; let kl = e / ${t.bn}u;`;
  const bIdx = tB ? 'gn * K + gk' : 'gk * N + gn';
  const code = `
const M: u32 = ${M}u;
const N: u32 = ${N}u;
const K: u32 = ${K}u;
const KC: u32 = ${kc}u;
const BM: u32 = ${t.bm}u;
const BN: u32 = ${t.bn}u;
const BK: u32 = ${t.bk}u;
const NT: u32 = ${threads}u;
const SA: u32 = ${sa}u;
const SB: u32 = ${sb}u;
var<workgroup> As: array<vec4<f32>, ${t.bk * sa}>;
var<workgroup> Bs: array<vec4<f32>, ${t.bk * sb}>;
fn kernel(index: i32) {
  let lid = localIndex;
  let tx = lid % ${tx}u;
  let ty = lid / ${tx}u;
  let m0 = workgroupId.y * BM;
  let n0 = workgroupId.x * BN;
  let k0 = workgroupId.z * KC;
  let kEnd = min(K, k0 + KC);
  var acc: array<vec4<f32>, ${t.tm * tn4}>;
  for (var i = 0u; i < ${t.tm * tn4}u; i++) { acc[i] = vec4<f32>(0.0); }
  var ra: array<f32, ${la}>;
  var rb: array<f32, ${lb}>;
  // Slab 0 into registers.
  for (var j = 0u; j < ${la}u; j++) {
    let e = lid + j * NT;
    ${aMap}
    let gm = m0 + ml; let gk = k0 + kl;
    ra[j] = select(0.0, A[min(${aIdx}, ${M * K - 1}u)], gm < M && gk < kEnd);
  }
  for (var j = 0u; j < ${lb}u; j++) {
    let e = lid + j * NT;
    ${bMap}
    let gn = n0 + nl; let gk = k0 + kl;
    rb[j] = select(0.0, B[min(${bIdx}, ${K * N - 1}u)], gn < N && gk < kEnd);
  }
  for (var s = 0u; s < ${Math.ceil(kc / t.bk)}u; s++) {
    for (var j = 0u; j < ${la}u; j++) {
      let e = lid + j * NT;
      ${aMap}
      As[kl * SA + ml / 4u][ml % 4u] = ra[j];
    }
    for (var j = 0u; j < ${lb}u; j++) {
      let e = lid + j * NT;
      ${bMap}
      Bs[kl * SB + nl / 4u][nl % 4u] = rb[j];
    }
    workgroupBarrier();
    if (s + 1u < ${Math.ceil(kc / t.bk)}u) {
      let kb = k0 + (s + 1u) * BK;
      for (var j = 0u; j < ${la}u; j++) {
        let e = lid + j * NT;
        ${aMap}
        let gm = m0 + ml; let gk = kb + kl;
        ra[j] = select(0.0, A[min(${aIdx}, ${M * K - 1}u)], gm < M && gk < kEnd);
      }
      for (var j = 0u; j < ${lb}u; j++) {
        let e = lid + j * NT;
        ${bMap}
        let gn = n0 + nl; let gk = kb + kl;
        rb[j] = select(0.0, B[min(${bIdx}, ${K * N - 1}u)], gn < N && gk < kEnd);
      }
    }
    for (var kk = 0u; kk < BK; kk++) {
      var a: array<vec4<f32>, ${tm4}>;
      var b: array<vec4<f32>, ${tn4}>;
      for (var i = 0u; i < ${tm4}u; i++) { a[i] = As[kk * SA + i * ${ty}u + ty]; }
      for (var j = 0u; j < ${tn4}u; j++) { b[j] = Bs[kk * SB + j * ${tx}u + tx]; }
      for (var i = 0u; i < ${tm4}u; i++) {
        for (var c = 0u; c < 4u; c++) {
          let av = vec4<f32>(a[i][c]);
          for (var j = 0u; j < ${tn4}u; j++) {
            let q = (i * 4u + c) * ${tn4}u + j;
            acc[q] = fma(av, b[j], acc[q]);
          }
        }
      }
    }
    workgroupBarrier();
  }
  let base = workgroupId.z * M * N;
  for (var i = 0u; i < ${tm4}u; i++) {
    for (var c = 0u; c < 4u; c++) {
      let gm = m0 + (i * ${ty}u + ty) * 4u + c;
      if (gm < M) {
        for (var j = 0u; j < ${tn4}u; j++) {
          let gn = n0 + (j * ${tx}u + tx) * 4u;
          let v = acc[(i * 4u + c) * ${tn4}u + j];
          let o = base + gm * N + gn;
          if (gn + 3u < N) {
            result[o] = v.x; result[o + 1u] = v.y; result[o + 2u] = v.z; result[o + 3u] = v.w;
          } else {
            for (var q = 0u; q < 4u; q++) { if (gn + q < N) { result[o + q] = v[q]; } }
          }
        }
      }
    }
  }
}`;
  return { code, bytes: 16 * t.bk * (sa + sb) };
}

const REDUCE_WG = 256;
const REDUCE_MAX_GROUPS = 4096;

/** Sums partials P [S, M, N] over S in slice order → [M, N]. */
function sumSlices(P: tf.Tensor, S: number, M: number, N: number): tf.Tensor2D {
  const MN = M * N;
  const groups = Math.min(Math.ceil(MN / REDUCE_WG), REDUCE_MAX_GROUPS);
  return runWgsl({
    key: `tsgemm_sum_${S}x${MN}`,
    names: ['P'],
    inputs: [P],
    outputShape: [M, N],
    dtype: 'float32',
    workgroupSize: REDUCE_WG,
    dispatch: [groups, 1, 1],
    workgroupBytes: 0,
    code: `
fn kernel(index: i32) {
  for (var i = u32(index); i < ${MN}u; i += ${groups * REDUCE_WG}u) {
    var s = P[i];
    for (var z = 1u; z < ${S}u; z++) { s += P[z * ${MN}u + i]; }
    result[i] = s;
  }
}`,
  }) as tf.Tensor2D;
}

/**
 * op(a)·op(b) in float32 by the register-tiled WGSL GEMM (see the file header), on the webgpu
 * backend. a is [M, K] ([K, M] with transposeA), b is [K, N] ([N, K] with transposeB); returns [M, N].
 * The transposed forms read the operand in place.
 * @throws KvpackError('unsupported') off the webgpu backend; KvpackError('shape') for operands that
 *   are not 2-D or whose inner dimensions differ, or a product over 2³² − 1 elements;
 *   KvpackError('dtype') for a non-float32 operand; KvpackError('config') for a bad tile or splitK.
 */
export function wgslMatmul(a: tf.Tensor2D, b: tf.Tensor2D, transposeA = false, transposeB = false, opts: WgslMatmulOptions = {}): tf.Tensor2D {
  if (!isWebGpuBackend()) throw new KvpackError('unsupported', `wgslMatmul needs the webgpu backend, not ${tf.getBackend()}`);
  if (a.rank !== 2 || b.rank !== 2) throw new KvpackError('shape', `wgslMatmul: operands must be 2-D, got [${a.shape}] and [${b.shape}]`);
  if (a.dtype !== 'float32' || b.dtype !== 'float32') throw new KvpackError('dtype', `wgslMatmul: operands must be float32, got ${a.dtype} and ${b.dtype}`);
  const [M, Ka] = transposeA ? [a.shape[1], a.shape[0]] : a.shape;
  const [Kb, N] = transposeB ? [b.shape[1], b.shape[0]] : b.shape;
  if (Ka !== Kb) throw new KvpackError('shape', `wgslMatmul: inner dimensions differ: op(a) is [${M}, ${Ka}], op(b) is [${Kb}, ${N}]`);
  const K = Ka;
  const tile = opts.tile ?? GEMM_TILES['128x64'];
  const threads = checkTile(tile);
  const S = opts.splitK ?? defaultSplitK(M, N, K, tile);
  if (!Number.isInteger(S) || S < 1) throw new KvpackError('config', `wgslMatmul: splitK must be a positive integer, got ${S}`);
  // Each slice a whole number of slabs; S then shrinks if the last slices would be empty.
  const kc = Math.max(tile.bk, Math.ceil(K / S / tile.bk) * tile.bk);
  const slices = Math.max(1, Math.ceil(K / kc));
  if ([M * K, K * N, slices * M * N].some((v) => v > 2 ** 32 - 1)) throw new KvpackError('shape', `wgslMatmul: [${M}, ${K}]·[${K}, ${N}] (${slices} slices) has more than 2³² − 1 elements in an operand or the output`);
  if (M === 0 || N === 0) return tf.zeros([M, N]) as tf.Tensor2D;
  if (K === 0) return tf.zeros([M, N]) as tf.Tensor2D;
  const { code, bytes } = gemmCode(M, N, K, kc, transposeA, transposeB, tile, threads);
  const tileKey = `${tile.bm}x${tile.bn}x${tile.bk}_${tile.tm}x${tile.tn}`;
  const out = runWgsl({
    key: `tsgemm_${transposeA ? 't' : 'n'}${transposeB ? 't' : 'n'}_${M}x${N}x${K}_kc${kc}_${tileKey}`,
    names: ['A', 'B'],
    inputs: [a, b],
    outputShape: slices === 1 ? [M, N] : [slices, M, N],
    dtype: 'float32',
    workgroupSize: threads,
    dispatch: [Math.ceil(N / tile.bn), Math.ceil(M / tile.bm), slices],
    workgroupBytes: bytes,
    code,
  });
  if (slices === 1) return out as tf.Tensor2D;
  try {
    return sumSlices(out, slices, M, N);
  } finally {
    out.dispose();
  }
}

/** Which product {@link rangeFinderMatmul} picks on webgpu: the WGSL GEMM (default) or tfjs's matMul. */
let productKernels: 'wgsl' | 'tfjs' = 'wgsl';

/**
 * Chooses the products of the range finder on the webgpu backend (for benchmarks comparing the two):
 * `wgsl` (default) the tiled GEMM of this file, `tfjs` tf.matMul.
 * @throws KvpackError('config') for another value.
 */
export function setRangeFinderProducts(kind: 'wgsl' | 'tfjs'): void {
  if (kind !== 'wgsl' && kind !== 'tfjs') throw new KvpackError('config', `range finder products must be 'wgsl' or 'tfjs', got ${String(kind)}`);
  productKernels = kind;
}

/**
 * The product the randomized range finder uses (core `truncatedSvd`'s `matmul` option): on webgpu,
 * {@link wgslMatmul} (unless {@link setRangeFinderProducts}('tfjs')); elsewhere undefined (core's own
 * matmul, i.e. tf.matMul).
 */
export function rangeFinderMatmul(): ((a: tf.Tensor2D, b: tf.Tensor2D, transposeA: boolean, transposeB: boolean) => tf.Tensor2D) | undefined {
  if (!isWebGpuBackend() || productKernels !== 'wgsl') return undefined;
  return (a, b, tA, tB) => (a.dtype === 'float32' && b.dtype === 'float32' ? wgslMatmul(a, b, tA, tB) : matmul(a, b, tA, tB));
}
