import { ropeTableData64, type KVCache } from '@kvpack/core';
import { encodeSparseLayer, sparseGeometry, type SparseIndex, type SparseLayer } from './sparse-index.js';
import type { SparseOptions } from './sparse-options.js';

/**
 * Builds the sparse index from a prefill cache's exact keys and values (compress time). Keys are
 * rotated on the host in float64 at positions startPosition…; each landmark is the float64 mean of its
 * chunk's post-RoPE keys (per KV head), stored as float16. The outlier score of a chunk is the lowest
 * cosine similarity between one of its keys and its landmark (as ShadowKV: cos = x·y / max(‖x‖‖y‖,
 * 1e-8)); the O lowest per KV head are outliers (ties: lower chunk first).
 */
export async function buildSparseIndexOnHost(cache: KVCache, T: number, o: SparseOptions): Promise<SparseIndex> {
  const { nKvHeads: Hkv, headDim: d, nLayers } = cache.layout;
  const F = Hkv * d;
  const c = o.chunkSize;
  const { chunks: C, outliers: O, local } = sparseGeometry(T, o);
  const half = d / 2;
  const { cos: cosT, sin: sinT } = ropeTableData64(cache.rope, d, { start: cache.startPosition ?? 0, count: T });
  const interleaved = cache.rope.layout === 'interleaved';
  const pairA = (i: number) => (interleaved ? 2 * i : i);
  const pairB = (i: number) => (interleaved ? 2 * i + 1 : i + half);
  /** Post-RoPE key of token t, KV head h, into out[off … off + d). */
  const rotate = (x: Float32Array, t: number, h: number, out: Float64Array | Float32Array, off: number) => {
    const base = t * F + h * d;
    for (let i = 0; i < half; i++) {
      const a = x[base + pairA(i)];
      const b = x[base + pairB(i)];
      const cs = cosT[t * half + i];
      const sn = sinT[t * half + i];
      out[off + pairA(i)] = a * cs - b * sn;
      out[off + pairB(i)] = b * cs + a * sn;
    }
  };
  const layers: SparseLayer[] = [];
  const key = new Float64Array((C > 0 ? c : 0) * d); // c ≤ T when there is a chunk
  const mean = new Float64Array(d);
  for (let l = 0; l < nLayers; l++) {
    const K = (await cache.keys[l].data()) as Float32Array;
    const V = (await cache.values[l].data()) as Float32Array;
    const lm = new Float32Array(C * F);
    const score = new Float64Array(Hkv * C);
    for (let ch = 0; ch < C; ch++) {
      for (let h = 0; h < Hkv; h++) {
        mean.fill(0);
        for (let j = 0; j < c; j++) {
          rotate(K, ch * c + j, h, key, j * d);
          for (let e = 0; e < d; e++) mean[e] += key[j * d + e];
        }
        let nm = 0;
        for (let e = 0; e < d; e++) {
          mean[e] /= c;
          nm += mean[e] * mean[e];
          lm[ch * F + h * d + e] = mean[e];
        }
        nm = Math.sqrt(nm);
        let lowest = Infinity;
        for (let j = 0; j < c; j++) {
          let dot = 0;
          let nk = 0;
          for (let e = 0; e < d; e++) {
            dot += key[j * d + e] * mean[e];
            nk += key[j * d + e] * key[j * d + e];
          }
          lowest = Math.min(lowest, dot / Math.max(Math.sqrt(nk) * nm, 1e-8));
        }
        score[h * C + ch] = lowest;
      }
    }
    const outl = new Int32Array(Hkv * O);
    for (let h = 0; h < Hkv; h++) {
      const order = Array.from({ length: C }, (_, i) => i).sort((a, b) => score[h * C + a] - score[h * C + b] || a - b);
      const pick = order.slice(0, O).sort((a, b) => a - b);
      outl.set(pick, h * O);
    }
    const oK = new Float32Array(Hkv * O * c * d);
    const oV = new Float32Array(Hkv * O * c * d);
    for (let h = 0; h < Hkv; h++)
      for (let k = 0; k < O; k++)
        for (let j = 0; j < c; j++) {
          const t = outl[h * O + k] * c + j;
          const off = ((h * O + k) * c + j) * d;
          rotate(K, t, h, oK, off);
          oV.set(V.subarray(t * F + h * d, t * F + h * d + d), off);
        }
    const lK = new Float32Array(local * F);
    for (let u = 0; u < local; u++) for (let h = 0; h < Hkv; h++) rotate(K, C * c + u, h, lK, u * F + h * d);
    const lV = V.slice(C * c * F, T * F);
    layers.push(encodeSparseLayer(lm, outl, oK, oV, lK, lV));
  }
  return { options: o, chunkSize: c, chunks: C, outliers: O, local, layers };
}
