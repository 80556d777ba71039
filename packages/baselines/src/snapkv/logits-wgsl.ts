import * as tf from '@tensorflow/tfjs-core';
import { check, runWgsl } from '@kvpack/core';
import { gemmTileWgsl } from '@kvpack/strategy-utils';

/*
 * SnapKV's window logits on webgpu as one register-tiled WGSL GEMM read straight from the cache
 * layouts: for KV head h, logits[h, q·w + i, j] = Σ_c Q[T_obs − w + i, h·g + q, c] · K[j, h, c]
 * (query head q of the head's GQA group, window query i, key j; unscaled). The keys are read in place
 * from [T, H_kv, d] (row stride H_kv·d) and the window queries from the whole [T_obs, H, d] query
 * tensor, so neither is sliced nor transposed first.
 *
 * One workgroup computes a BM×BN tile of one head's [g·w, T] logits: BK-deep slabs of the queries
 * [BM, BK] and the keys [BN, BK] are staged in workgroup memory k-major (read as vec4), the next slab
 * is prefetched into registers while the current one is multiplied, and each invocation accumulates a
 * TM×TN micro-tile in vec4 registers (rows strided by 4·BM/TM, so that neighbouring invocations read
 * neighbouring vec4s). Global loads run along head_dim, the contiguous axis of both operands
 * (coalesced); edges in g·w, T and d are zero-filled, so any shape works.
 */

/** Tile of one workgroup: BM×BN logits, BK-deep slabs, TM×TN logits per invocation (TM, TN multiples of 4). */
interface LogitsTile {
  bm: number;
  bn: number;
  bk: number;
  tm: number;
  tn: number;
}

/** g·w above 64 (Llama-3's 4 × 32 = 128): all 128 logit rows of a head in one tile. */
const TILE_128: LogitsTile = { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4 };
/** g·w ≤ 64: half the rows, so small groups or windows do not compute padding. */
const TILE_64: LogitsTile = { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 };

/** The tile for g·w logit rows per KV head. */
export function logitsTile(rows: number): LogitsTile {
  return rows > 64 ? TILE_128 : TILE_64;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/** The shader of {@link windowLogitsWgsl} for tile t. */
function logitsCode(t: LogitsTile): { code: string; bytes: number; threads: number } {
  const threads = (t.bm / t.tm) * (t.bn / t.tn);
  const sa = (t.bm + 4) / 4; // k-major rows of the slab, padded by one vec4 against bank conflicts
  const sb = (t.bn + 4) / 4;
  const la = ((t.bm / 4) * t.bk) / threads; // vec4 groups of the query slab per invocation
  const lb = ((t.bn / 4) * t.bk) / threads;
  check(Number.isInteger(la) && Number.isInteger(lb) && threads <= 256, 'config', `snapkv logits: tile ${JSON.stringify(t)} does not divide among ${threads} invocations`);
  const ty = t.bm / t.tm;
  const tx = t.bn / t.tn;
  const tm4 = t.tm / 4;
  const tn4 = t.tn / 4;
  // Slab group j of an invocation: 4 consecutive rows (queries) or keys at one k, whose 4 scalar
  // loads are coalesced across invocations along head_dim; stored as one whole vec4 (no two
  // invocations write parts of one vec4).
  const pos = (j: number) => `(lid + ${j * threads}u)`;
  const loadA = (kb: string) =>
    range(la)
      .map((j) => {
        const one = (c: number) => `qAt(gm + ${c}u, gk, kOk)`;
        return `    { let gm = m0 + 4u * (${pos(j)} / BK); let gk = ${kb} + ${pos(j)} % BK; let kOk = gk < D;
      ra${j} = vec4<f32>(${range(4).map(one).join(', ')}); }`;
      })
      .join('\n');
  const loadB = (kb: string) =>
    range(lb)
      .map((j) => {
        const one = (c: number) => `kAt(gn + ${c}u, gk, kOk)`;
        return `    { let gn = n0 + 4u * (${pos(j)} / BK); let gk = ${kb} + ${pos(j)} % BK; let kOk = gk < D;
      rb${j} = vec4<f32>(${range(4).map(one).join(', ')}); }`;
      })
      .join('\n');
  const storeA = range(la)
    .map((j) => `    As[(${pos(j)} % BK) * SA + ${pos(j)} / BK] = ra${j};`)
    .join('\n');
  const storeB = range(lb)
    .map((j) => `    Bs[(${pos(j)} % BK) * SB + ${pos(j)} / BK] = rb${j};`)
    .join('\n');
  const code = `
const BM: u32 = ${t.bm}u;
const BN: u32 = ${t.bn}u;
const BK: u32 = ${t.bk}u;
const SA: u32 = ${sa}u;
const SB: u32 = ${sb}u;
var<workgroup> As: array<vec4<f32>, ${t.bk * sa}>;
var<workgroup> Bs: array<vec4<f32>, ${t.bk * sb}>;
// Sizes from tfjs's uniforms (one pipeline per tile, whatever the shapes).
var<private> G: u32; // query heads per KV head
var<private> W: u32; // window
var<private> M: u32; // logit rows per KV head, g·w
var<private> HQ: u32;
var<private> HKV: u32;
var<private> D: u32; // head_dim
var<private> head: u32;
var<private> obs0: u32; // first window query
var<private> nKeys: u32;
// Logit row m = q·w + i of head h: window query i of query head h·g + q; zero past the rows or head_dim.
fn qAt(m: u32, k: u32, kOk: bool) -> f32 {
  let q = m / W;
  let e = ((obs0 + m - q * W) * HQ + head * G + q) * D + k;
  return select(0.0, Q[min(e, u32(uniforms.qShape.x) * HQ * D - 1u)], m < M && kOk);
}
// Key j of head h in the cache layout [T, H_kv, d]; zero past T or head_dim.
fn kAt(j: u32, k: u32, kOk: bool) -> f32 {
  return select(0.0, K[min((j * HKV + head) * D + k, nKeys * HKV * D - 1u)], j < nKeys && kOk);
}
fn kernel(index: i32) {
  nKeys = u32(uniforms.kShape.x);
  HQ = u32(uniforms.qShape.y);
  HKV = u32(uniforms.kShape.y);
  D = u32(uniforms.kShape.z);
  G = HQ / HKV;
  M = u32(uniforms.outShape.y);
  W = M / G;
  obs0 = u32(uniforms.qShape.x) - W;
  head = workgroupId.z;
  let h = head;
  let T = nKeys;
  let lid = localIndex;
  let tx = lid % ${tx}u;
  let ty = lid / ${tx}u;
  let m0 = workgroupId.y * BM;
  let n0 = workgroupId.x * BN;
  let slabs = (u32(uniforms.kShape.z) + BK - 1u) / BK; // from the uniform itself: the barriers stay in uniform control flow
${gemmTileWgsl({ tm4, tn4, ty, tx, la, lb, start: '0u', slabs: 'slabs', loadA, loadB, storeA, storeB, rows: 'M', cols: 'T', out: (gm, gn) => `(h * M + ${gm}) * T + ${gn}` })}
}`;
  return { code, bytes: 16 * t.bk * (sa + sb), threads };
}

/**
 * The unscaled window logits [H_kv, g·w, T] (row q·w + i: query head h·g + q, window query i) of the
 * last w of the post-RoPE queries [T_obs, H, d] (T_obs ≥ w) against the post-RoPE keys
 * [T, H_kv, d], read in place (see the file header). float32; transient, owned by the caller.
 * @throws KvpackError('dtype') for operands that are not float32; KvpackError('shape') when the
 *   head counts or head_dim disagree, T_obs < w, or the logits exceed 2³² − 1 elements.
 */
export function windowLogitsWgsl(queries: tf.Tensor3D, w: number, keys: tf.Tensor3D): tf.Tensor3D {
  const [Tobs, Hq, d] = queries.shape;
  const [T, Hkv, dk] = keys.shape;
  check(queries.dtype === 'float32' && keys.dtype === 'float32', 'dtype', `snapkv logits: queries and keys must be float32, got ${queries.dtype} and ${keys.dtype}`);
  check(dk === d && Hq % Hkv === 0, 'shape', `snapkv logits: queries [${queries.shape}] do not fit keys [${keys.shape}] (same head_dim, query heads a multiple of KV heads)`);
  check(Number.isInteger(w) && w >= 1 && w <= Tobs, 'shape', `snapkv logits: window ${w} outside 1 … ${Tobs} queries`);
  const g = Hq / Hkv;
  const M = g * w;
  check(Hkv * M * T <= 2 ** 32 - 1 && T * Hkv * d <= 2 ** 32 - 1 && Tobs * Hq * d <= 2 ** 32 - 1, 'shape', `snapkv logits: [${Hkv}, ${M}, ${T}] logits or their operands exceed 2³² − 1 elements`);
  const tile = logitsTile(M);
  const { code, bytes, threads } = logitsCode(tile);
  return runWgsl({
    key: `snapkv_logits_${tile.bm}x${tile.bn}x${tile.bk}_${tile.tm}x${tile.tn}`,
    names: ['Q', 'K'],
    inputs: [queries, keys],
    outputShape: [Hkv, M, T],
    dtype: 'float32',
    workgroupSize: threads,
    dispatch: [Math.ceil(T / tile.bn), Math.ceil(M / tile.bm), Hkv],
    workgroupBytes: bytes,
    code,
  }) as tf.Tensor3D;
}
