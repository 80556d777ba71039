import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, isWebGpuBackend, matmul, runWgsl } from '@kvpack/core';
import { gemmTileWgsl } from '../wgsl-gemm-tile.js';

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
  /**
   * Load an operand stored along the tile's rows or columns (op(A) = Aᵀ, or B not transposed) as one
   * vec4 per four elements instead of four scalar loads, when its stored row length is a multiple of 4.
   */
  vec4Loads?: boolean;
}

/** Tiles the benchmark compares; `128x64` is the default. */
export const GEMM_TILES: Record<string, GemmTile> = {
  '128x64': { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4 },
  '128x128': { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8 },
  '128x64v': { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4, vec4Loads: true },
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
    ((t.bm / 4) * t.bk) % threads === 0 &&
    (t.bk * (t.bn / 4)) % threads === 0;
  if (!ok) throw new KvpackError('config', `wgslMatmul: tile ${JSON.stringify(t)} is not valid (TM, TN multiples of 4 dividing BM, BN; at most 256 invocations; a slab's vec4s divisible by the invocations)`);
  return threads;
}

function gemmCode(split: boolean, tA: boolean, tB: boolean, t: GemmTile, threads: number, vecA: boolean, vecB: boolean): { code: string; bytes: number } {
  const padA = tA ? 0 : 4; // A stored [M, K] is written k-major with stride BM: pad against bank conflicts
  const padB = tB ? 4 : 0;
  const sa = (t.bm + padA) / 4;
  const sb = (t.bn + padB) / 4;
  // Slab loads by vec4 groups: group g = lid + j·NT of op(A)'s slab is 4 consecutive rows m at one k
  // (4 scalar loads, coalesced across invocations along the stored row), stored to workgroup memory as
  // one whole vec4 (no two invocations write parts of one vec4). Likewise 4 columns n of op(B).
  const la = ((t.bm / 4) * t.bk) / threads;
  const lb = (t.bk * (t.bn / 4)) / threads;
  const ty = t.bm / t.tm;
  const tx = t.bn / t.tn;
  const tm4 = t.tm / 4;
  const tn4 = t.tn / 4;
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  // Everything indexed per invocation is unrolled into named registers (no private arrays, which a
  // driver may place in local memory): slab group j of A is ra{j}, accumulator row r column block
  // q is c{r}_{q}.
  const aPos = (j: number) => {
    const g = `(lid + ${j * threads}u)`;
    return tA ? { m4: `(${g} % ${t.bm / 4}u)`, kl: `(${g} / ${t.bm / 4}u)` } : { m4: `(${g} / ${t.bk}u)`, kl: `(${g} % ${t.bk}u)` };
  };
  const bPos = (j: number) => {
    const g = `(lid + ${j * threads}u)`;
    return tB ? { n4: `(${g} / ${t.bk}u)`, kl: `(${g} % ${t.bk}u)` } : { n4: `(${g} % ${t.bn / 4}u)`, kl: `(${g} / ${t.bn / 4}u)` };
  };
  const comps4 = [0, 1, 2, 3];
  const loadA = (kb: string) =>
    range(la)
      .map((j) => {
        const { m4, kl } = aPos(j);
        const one = (c: number) => `select(0.0, A[min(${tA ? `gk * M + gm + ${c}u` : `(gm + ${c}u) * K + gk`}, lastA)], gm + ${c}u < M && kOk)`;
        // vec4: M is a multiple of 4, so gm < M covers the four rows.
        const load = vecA ? `select(vec4<f32>(0.0), A[min((gk * M + gm) / 4u, lastA / 4u)], gm < M && kOk)` : `vec4<f32>(${comps4.map(one).join(', ')})`;
        return `    { let gm = m0 + 4u * ${m4}; let gk = ${kb} + ${kl}; let kOk = gk < kEnd;\n      ra${j} = ${load}; }`;
      })
      .join('\n');
  const loadB = (kb: string) =>
    range(lb)
      .map((j) => {
        const { n4, kl } = bPos(j);
        const one = (c: number) => `select(0.0, B[min(${tB ? `(gn + ${c}u) * K + gk` : `gk * N + gn + ${c}u`}, lastB)], gn + ${c}u < N && kOk)`;
        const load = vecB ? `select(vec4<f32>(0.0), B[min((gk * N + gn) / 4u, lastB / 4u)], gn < N && kOk)` : `vec4<f32>(${comps4.map(one).join(', ')})`;
        return `    { let gn = n0 + 4u * ${n4}; let gk = ${kb} + ${kl}; let kOk = gk < kEnd;\n      rb${j} = ${load}; }`;
      })
      .join('\n');
  const storeA = range(la)
    .map((j) => {
      const { m4, kl } = aPos(j);
      return `    As[${kl} * SA + ${m4}] = ra${j};`;
    })
    .join('\n');
  const storeB = range(lb)
    .map((j) => {
      const { n4, kl } = bPos(j);
      return `    Bs[${kl} * SB + ${n4}] = rb${j};`;
    })
    .join('\n');
  const code = `
const BM: u32 = ${t.bm}u;
const BN: u32 = ${t.bn}u;
const BK: u32 = ${t.bk}u;
const SA: u32 = ${sa}u;
const SB: u32 = ${sb}u;
var<workgroup> As: array<vec4<f32>, ${t.bk * sa}>;
var<workgroup> Bs: array<vec4<f32>, ${t.bk * sb}>;
fn kernel(index: i32) {
  // Shapes from tfjs's uniforms (one pipeline per transpose/split/tile, whatever the sizes).
  let M = u32(uniforms.aShape.${tA ? 'y' : 'x'});
  let K = u32(uniforms.aShape.${tA ? 'x' : 'y'});
  let N = u32(uniforms.bShape.${tB ? 'x' : 'y'});
  let S = ${split ? 'u32(uniforms.outShape.x)' : '1u'};
  // K slice of a workgroup: a whole number of BK-deep slabs (the host picks S so that none is empty).
  let KC = ((K + S - 1u) / S + BK - 1u) / BK * BK;
  let slabs = KC / BK;
  let lastA = M * K - 1u;
  let lastB = K * N - 1u;
  let lid = localIndex;
  let tx = lid % ${tx}u;
  let ty = lid / ${tx}u;
  let m0 = workgroupId.y * BM;
  let n0 = workgroupId.x * BN;
  let k0 = workgroupId.z * KC;
  let kEnd = min(K, k0 + KC);
  let base = workgroupId.z * M * N;
${gemmTileWgsl({ tm4, tn4, ty, tx, la, lb, start: 'k0', slabs: 'slabs', loadA, loadB, storeA, storeB, rows: 'M', cols: 'N', out: (gm, gn) => `base + ${gm} * N + ${gn}` })}
}`;
  return { code, bytes: 16 * t.bk * (sa + sb) };
}

const REDUCE_WG = 256;
const REDUCE_MAX_GROUPS = 4096;

/** Sums partials P [S, M, N] over S in slice order → [M, N]. */
function sumSlices(P: tf.Tensor, M: number, N: number): tf.Tensor2D {
  const MN = M * N;
  const groups = Math.min(Math.ceil(MN / REDUCE_WG), REDUCE_MAX_GROUPS);
  return runWgsl({
    key: 'tsgemm_sum',
    names: ['P'],
    inputs: [P],
    outputShape: [M, N],
    dtype: 'float32',
    workgroupSize: REDUCE_WG,
    dispatch: [groups, 1, 1],
    workgroupBytes: 0,
    code: `
fn kernel(index: i32) {
  let S = u32(uniforms.pShape.x);
  let MN = u32(uniforms.pShape.y) * u32(uniforms.pShape.z);
  for (var i = u32(index); i < MN; i += numWorkgroups.x * ${REDUCE_WG}u) {
    var s = P[i];
    for (var z = 1u; z < S; z++) { s += P[z * MN + i]; }
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
  // The shader's slice length from (K, slices) must cover K as the host's does.
  // vec4 loads of an operand stored along the tile's rows (Aᵀ) or columns (B), rows a multiple of 4.
  const vecA = !!tile.vec4Loads && transposeA && M % 4 === 0;
  const vecB = !!tile.vec4Loads && !transposeB && N % 4 === 0;
  const { code, bytes } = gemmCode(slices > 1, transposeA, transposeB, tile, threads, vecA, vecB);
  const tileKey = `${tile.bm}x${tile.bn}x${tile.bk}_${tile.tm}x${tile.tn}${vecA ? '_va' : ''}${vecB ? '_vb' : ''}`;
  const out = runWgsl({
    key: `tsgemm_${transposeA ? 't' : 'n'}${transposeB ? 't' : 'n'}_${slices > 1 ? 'split' : 'whole'}_${tileKey}`,
    names: ['A', 'B'],
    inputs: [a, b],
    outputShape: slices === 1 ? [M, N] : [slices, M, N],
    dtype: 'float32',
    workgroupSize: threads,
    dispatch: [Math.ceil(N / tile.bn), Math.ceil(M / tile.bm), slices],
    workgroupBytes: bytes,
    code,
    ...(vecA || vecB ? { components: { inputs: [vecA ? 4 : 1, vecB ? 4 : 1] } } : {}),
  });
  if (slices === 1) return out as tf.Tensor2D;
  try {
    return sumSlices(out, M, N);
  } finally {
    out.dispose();
  }
}

/**
 * Which product {@link rangeFinderMatmul} picks on webgpu: the WGSL GEMM of this file (default) or
 * tfjs's matMul. Measured on an H100 (scripts/gpu/gemm-bench.ts, the range finder's products of one
 * G = 4 group at T = 32K, rank 512, 2026-12-07): the four products in 20.1 ms with the best tiles
 * against 27.2 ms with tf.matMul, equal to it within 3.5e-6 relative.
 */
let productKernels: 'wgsl' | 'tfjs' = 'wgsl';
let productTile: GemmTile | undefined;

/**
 * Chooses the products of the range finder on the webgpu backend (for benchmarks comparing the two):
 * `wgsl` the tiled GEMM of this file (default), with `tile` (a key of {@link GEMM_TILES}; default
 * 128x64), or `tfjs` tf.matMul.
 * @throws KvpackError('config') for another value or an unknown tile.
 */
export function setRangeFinderProducts(kind: 'wgsl' | 'tfjs', tile?: string): void {
  if (kind !== 'wgsl' && kind !== 'tfjs') throw new KvpackError('config', `range finder products must be 'wgsl' or 'tfjs', got ${String(kind)}`);
  if (tile !== undefined && !GEMM_TILES[tile]) throw new KvpackError('config', `unknown GEMM tile ${tile}; choose one of ${Object.keys(GEMM_TILES).join(', ')}`);
  productKernels = kind;
  productTile = tile === undefined ? undefined : GEMM_TILES[tile];
}

/**
 * The product the randomized range finder uses (core `truncatedSvd`'s `matmul` option): on webgpu,
 * {@link wgslMatmul} after {@link setRangeFinderProducts}('wgsl'); otherwise undefined (core's own
 * matmul, i.e. tf.matMul).
 */
export function rangeFinderMatmul(): ((a: tf.Tensor2D, b: tf.Tensor2D, transposeA: boolean, transposeB: boolean) => tf.Tensor2D) | undefined {
  if (!isWebGpuBackend() || productKernels !== 'wgsl') return undefined;
  const tile = productTile;
  return (a, b, tA, tB) => (a.dtype === 'float32' && b.dtype === 'float32' ? wgslMatmul(a, b, tA, tB, { tile }) : matmul(a, b, tA, tB));
}
