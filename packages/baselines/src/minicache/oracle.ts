import { decodeHalf, encodeHalf } from '@kvpack/core';
import { PARALLEL_EPS, retainedCount } from './index.js';

/*
 * The host float64 form of MiniCache's merge: the test oracle of the backend merge
 * (mergeLayerPairOnBackend in index.ts), which the strategy runs. Not part of the package's build.
 */

/**
 * The merged form of one adjacent layer pair (l0 = S + 2i, l1 = l0 + 1), for keys or for values,
 * T tokens × H_kv KV heads × d channels. All floats are float16 bit patterns.
 */
export interface MergedPair {
  /** Shared unit direction per token per KV head (SLERP of the two layers' directions), [T, H_kv, d]. */
  dir: Uint16Array;
  /** Per-token norms of the lower and upper layer, [T, H_kv] each. */
  norm0: Uint16Array;
  norm1: Uint16Array;
  /** Retained (unmerged) token positions per KV head, ascending, [k, H_kv]. */
  idx: Int32Array;
  /** The retained tokens' exact vectors of the lower and upper layer, [k, H_kv, d] each. */
  keep0: Uint16Array;
  keep1: Uint16Array;
  /** k: retained tokens per KV head. */
  retained: number;
}

/**
 * MiniCache's merge of two adjacent layers' states x0 (lower layer) and x1 (upper layer), each
 * [T, H, d] (MiniCache, Liu et al. 2024, arXiv 2405.14366, §4.1–4.2):
 * - per token per KV head, the vectors are split into norm ‖x‖ and unit direction u = x/‖x‖;
 * - the directions are merged by SLERP, e = sin((1−t)Ω)/sin Ω · u0 + sin(tΩ)/sin Ω · u1 with
 *   Ω = arccos(u0·u1), falling back to (1−t)·u0 + t·u1 when sin Ω < 1e-6 (Ω ≈ 0 or π);
 * - each layer keeps its own norm, so layer j is restored as ‖x_j‖·e;
 * - per KV head, the round(γ·T) token pairs with the **largest** angular distance Ω/π (the most
 *   distinct, i.e. least mergeable) are retained unmerged in both layers. This is the paper's stated
 *   rule ("keep highly distinct state pairs unmerged", §4.2). The xKV authors' port
 *   (abdelfattah-lab/xKV, xKV/customized_cache/fake_layer_merge_dynamic_cache.py,
 *   `slerp_merge_rows_batch`) thresholds Ω at d_min + γ·(d_max − d_min) and leaves the tokens
 *   *below* the threshold — the most similar ones — unmerged, which inverts the rule; we follow the
 *   paper, and take γ as the retained fraction (top-γ by angle, ties to the lower position).
 * Everything is computed in float64 and stored as float16. The backend merge follows the same rules
 * in float32 (Ω through atan2 there, arccos here).
 */
export function mergeLayerPair(x0: Float32Array, x1: Float32Array, T: number, H: number, d: number, t: number, gamma: number): MergedPair {
  const n = T * H;
  const dir = new Float64Array(n * d);
  const norm0 = new Float64Array(n);
  const norm1 = new Float64Array(n);
  const angle = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const o = i * d;
    let s0 = 0;
    let s1 = 0;
    for (let c = 0; c < d; c++) {
      s0 += x0[o + c] * x0[o + c];
      s1 += x1[o + c] * x1[o + c];
    }
    const a = Math.sqrt(s0);
    const b = Math.sqrt(s1);
    norm0[i] = a;
    norm1[i] = b;
    const ia = a > 0 ? 1 / a : 0;
    const ib = b > 0 ? 1 / b : 0;
    let dot = 0;
    for (let c = 0; c < d; c++) dot += x0[o + c] * ia * (x1[o + c] * ib);
    const omega = Math.acos(Math.min(1, Math.max(-1, dot)));
    angle[i] = omega;
    const so = Math.sin(omega);
    let w0: number;
    let w1: number;
    if (so < PARALLEL_EPS) {
      w0 = 1 - t;
      w1 = t;
    } else {
      w0 = Math.sin((1 - t) * omega) / so;
      w1 = Math.sin(t * omega) / so;
    }
    for (let c = 0; c < d; c++) dir[o + c] = w0 * x0[o + c] * ia + w1 * x1[o + c] * ib;
  }
  const k = retainedCount(T, gamma);
  const idx = new Int32Array(k * H);
  const keep0 = new Float32Array(k * H * d);
  const keep1 = new Float32Array(k * H * d);
  const order = new Int32Array(T);
  for (let h = 0; h < H; h++) {
    for (let i = 0; i < T; i++) order[i] = i;
    const chosen = Array.from(order)
      .sort((p, q) => angle[q * H + h] - angle[p * H + h] || p - q)
      .slice(0, k)
      .sort((p, q) => p - q);
    chosen.forEach((tok, j) => {
      idx[j * H + h] = tok;
      const src = (tok * H + h) * d;
      const dst = (j * H + h) * d;
      for (let c = 0; c < d; c++) {
        keep0[dst + c] = x0[src + c];
        keep1[dst + c] = x1[src + c];
      }
    });
  }
  return { dir: encodeHalf(dir), norm0: encodeHalf(norm0), norm1: encodeHalf(norm1), idx, keep0: encodeHalf(keep0), keep1: encodeHalf(keep1), retained: k };
}

/** Restores both layers of a merged pair, [T, H, d] float32 each: ‖x_j‖·e, with retained tokens exact. */
export function restoreLayerPair(m: MergedPair, T: number, H: number, d: number): [Float32Array, Float32Array] {
  const dir = decodeHalf(m.dir);
  const out: [Float32Array, Float32Array] = [new Float32Array(T * H * d), new Float32Array(T * H * d)];
  const norms = [decodeHalf(m.norm0), decodeHalf(m.norm1)];
  const keep = [decodeHalf(m.keep0), decodeHalf(m.keep1)];
  for (let j = 0; j < 2; j++) {
    const o = out[j];
    const nj = norms[j];
    for (let i = 0; i < T * H; i++) for (let c = 0; c < d; c++) o[i * d + c] = nj[i] * dir[i * d + c];
    for (let r = 0; r < m.retained; r++) {
      for (let h = 0; h < H; h++) {
        const tok = m.idx[r * H + h];
        o.set(keep[j].subarray((r * H + h) * d, (r * H + h + 1) * d), (tok * H + h) * d);
      }
    }
  }
  return out;
}

