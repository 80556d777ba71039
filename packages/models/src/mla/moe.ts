import * as tf from '@tensorflow/tfjs-core';
import type { MoeConfig } from './config.js';
import type { MoeWeights, SwigluWeights } from './weights.js';

/** y = W2·(silu(W1·h) ⊙ W3·h) for rows h [n, D]. */
export function swiglu(w: SwigluWeights, h: tf.Tensor2D): tf.Tensor2D {
  return tf.tidy(() => {
    const g = tf.matMul(h, w.w1);
    return tf.matMul(tf.mul(tf.mul(g, tf.sigmoid(g)), tf.matMul(h, w.w3)), w.w2) as tf.Tensor2D;
  });
}

/** The experts each token is sent to and their weights, row-major [n, k]. */
export interface Routing {
  experts: Int32Array;
  weights: Float64Array;
}

/** Indices of the k largest values (descending; ties to the lower index). */
function topk(values: ArrayLike<number>, k: number, allowed?: (i: number) => boolean): number[] {
  const idx: number[] = [];
  for (let i = 0; i < values.length; i++) if (!allowed || allowed(i)) idx.push(i);
  idx.sort((a, b) => values[b] - values[a] || a - b);
  return idx.slice(0, k);
}

/**
 * DeepSeek's router, on the host in float64 from the router logits [n, E] (DeepSeek-V2 §2.2.2,
 * DeepSeek-V3 §2.1.2; `MoEGate` of DeepSeek's modeling code):
 * scores = softmax(logits) or sigmoid(logits); the experts are the top-k of the scores (plus V3's
 * `e_score_correction_bias` under `noaux_tc`) restricted, for the group-limited methods, to the
 * `topk_group` best of `n_group` groups (ranked by their best score, or for `noaux_tc` by the sum of
 * their two best); their weights are the scores without the bias. Then, V2: normalized to sum 1
 * when norm_topk_prob (and k > 1), else multiplied by routed_scaling_factor; V3: normalized when
 * norm_topk_prob, then multiplied by routed_scaling_factor.
 * @param logits row-major [n, E]
 * @param v3 DeepSeek-V3's weight rule
 */
export function routeTokens(logits: Float32Array, n: number, m: MoeConfig, v3: boolean, scoreBias?: Float32Array): Routing {
  const E = m.nRoutedExperts;
  const k = m.topK;
  const experts = new Int32Array(n * k);
  const weights = new Float64Array(n * k);
  const scores = new Float64Array(E);
  const choice = new Float64Array(E);
  const perGroup = E / m.nGroup;
  for (let t = 0; t < n; t++) {
    const row = logits.subarray(t * E, (t + 1) * E);
    if (m.scoring === 'softmax') {
      let mx = -Infinity;
      for (let e = 0; e < E; e++) mx = Math.max(mx, row[e]);
      let s = 0;
      for (let e = 0; e < E; e++) s += (scores[e] = Math.exp(row[e] - mx));
      for (let e = 0; e < E; e++) scores[e] /= s;
    } else for (let e = 0; e < E; e++) scores[e] = 1 / (1 + Math.exp(-row[e]));
    for (let e = 0; e < E; e++) choice[e] = scores[e] + (m.topkMethod === 'noaux_tc' && scoreBias ? scoreBias[e] : 0);
    let allowed: ((e: number) => boolean) | undefined;
    if (m.topkMethod !== 'greedy') {
      const groupScore = new Float64Array(m.nGroup);
      for (let g = 0; g < m.nGroup; g++) {
        const members = choice.subarray(g * perGroup, (g + 1) * perGroup);
        if (m.topkMethod === 'group_limited_greedy') groupScore[g] = Math.max(...members);
        else {
          const best = topk(members, 2);
          groupScore[g] = members[best[0]] + members[best[1]];
        }
      }
      const keep = new Set(topk(groupScore, m.topkGroup));
      allowed = (e) => keep.has(Math.floor(e / perGroup));
    }
    const chosen = topk(choice, k, allowed);
    let sum = 0;
    for (const e of chosen) sum += scores[e];
    const normalize = m.normTopkProb && (v3 || k > 1);
    chosen.forEach((e, j) => {
      let w = scores[e];
      if (normalize) w /= sum + 1e-20;
      if (v3 || !normalize) w *= m.routedScalingFactor;
      experts[t * k + j] = e;
      weights[t * k + j] = w;
    });
  }
  return { experts, weights };
}

/**
 * The MoE feed-forward of rows h [n, D]: Σ over each token's routed experts of weight · expert(h),
 * plus the shared experts. Routing reads the router logits back (asynchronously) and runs on the
 * host; each routed expert runs once on the rows sent to it.
 */
export async function moeForward(w: MoeWeights, m: MoeConfig, v3: boolean, h: tf.Tensor2D): Promise<tf.Tensor2D> {
  const n = h.shape[0];
  const logitsT = tf.matMul(h, w.gate);
  let logits: Float32Array;
  try {
    logits = (await logitsT.data()) as Float32Array;
  } finally {
    logitsT.dispose();
  }
  const r = routeTokens(logits, n, m, v3, w.scoreBias);
  const rows = new Map<number, { tok: number[]; wt: number[] }>();
  for (let i = 0; i < r.experts.length; i++) {
    const e = r.experts[i];
    let g = rows.get(e);
    if (!g) rows.set(e, (g = { tok: [], wt: [] }));
    g.tok.push(Math.floor(i / m.topK));
    g.wt.push(r.weights[i]);
  }
  return tf.tidy(() => {
    let out: tf.Tensor2D = w.shared ? swiglu(w.shared, h) : tf.zeros([n, h.shape[1]]);
    for (const [e, g] of [...rows].sort(([a], [b]) => a - b)) {
      const idx = tf.tensor1d(g.tok, 'int32');
      const y = tf.mul(swiglu(w.experts[e], tf.gather(h, idx) as tf.Tensor2D), tf.tensor2d(g.wt, [g.wt.length, 1]));
      out = tf.add(out, tf.scatterND(idx.reshape([-1, 1]), y, [n, h.shape[1]])) as tf.Tensor2D;
    }
    return out;
  });
}
