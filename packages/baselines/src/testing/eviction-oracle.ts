/**
 * Float64 references for the token-eviction strategies' tests (not exported from the package),
 * written from the papers' descriptions, independently of the code under test.
 */
import type { ModelLayout } from '@kvpack/core';

/**
 * SnapKV's scores of one layer, [H_kv][T]: for each KV head, the softmax attention of each of the
 * last w queries (causal within the window) over all T keys, the weights of the T − w prefix keys
 * summed over the window and averaged over the GQA group, pooled (avg: zero-padded mean over the
 * kernel; max: over the valid neighbours); the w window tokens score +Infinity.
 * @param q post-RoPE queries of the last `tObs` tokens [tObs, H, d]
 * @param k post-RoPE keys [T, H_kv, d]
 */
export function snapkvScores64(q: ArrayLike<number>, tObs: number, k: ArrayLike<number>, T: number, w: number, layout: ModelLayout, kernel: number, pooling: 'avg' | 'max'): number[][] {
  const { nHeads: Hq, nKvHeads: H, headDim: d } = layout;
  const g = Hq / H;
  const out: number[][] = [];
  for (let h = 0; h < H; h++) {
    const vote = new Array(T - w).fill(0);
    for (let qh = h * g; qh < (h + 1) * g; qh++) {
      for (let i = 0; i < w; i++) {
        const row = tObs - w + i;
        const logits: number[] = [];
        for (let j = 0; j <= T - w + i; j++) {
          let s = 0;
          for (let c = 0; c < d; c++) s += q[(row * Hq + qh) * d + c] * k[(j * H + h) * d + c];
          logits.push(s / Math.sqrt(d));
        }
        const m = Math.max(...logits);
        const z = logits.reduce((a, x) => a + Math.exp(x - m), 0);
        for (let j = 0; j < T - w; j++) vote[j] += Math.exp(logits[j] - m) / z / g;
      }
    }
    const r = (kernel - 1) / 2;
    const pooled = vote.map((_, i) => {
      const nb = vote.slice(Math.max(0, i - r), Math.min(T - w, i + r + 1));
      return pooling === 'avg' ? nb.reduce((a, x) => a + x, 0) / kernel : Math.max(...nb);
    });
    out.push([...pooled, ...new Array(w).fill(Infinity)]);
  }
  return out;
}

/**
 * Attention of one query head over a list of (key, value) rows in float64: softmax(q·k/√d)·v.
 */
export function attend64(q: ArrayLike<number>, keys: ArrayLike<number>[], values: ArrayLike<number>[]): number[] {
  const d = q.length;
  const logits = keys.map((k) => {
    let s = 0;
    for (let c = 0; c < d; c++) s += q[c] * k[c];
    return s / Math.sqrt(d);
  });
  const m = Math.max(...logits);
  const w = logits.map((x) => Math.exp(x - m));
  const z = w.reduce((a, b) => a + b, 0);
  const out = new Array(d).fill(0);
  values.forEach((v, i) => {
    for (let c = 0; c < d; c++) out[c] += (w[i] / z) * v[c];
  });
  return out;
}
