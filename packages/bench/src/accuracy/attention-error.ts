import * as tf from '@tensorflow/tfjs-core';
import { applyRope, attention, check, type CompressedCache, type KVCache } from '@kvpack/core';
import { relativeError, type ErrorSums } from '../metrics.js';

/** Attention-output error of one compressed cache against the exact cache it came from. */
export interface AttentionOutputError {
  /** Query rows used per layer (the last `queries` prompt tokens). */
  queries: number;
  /** Per layer: Σ‖O − Ô‖² and Σ‖O‖² over the query rows, heads and channels (float64 sums). */
  perLayerSums: ErrorSums[];
  /** Per layer relative error ‖O − Ô‖_F / ‖O‖_F. */
  perLayer: number[];
  /** Pooled over layers: sqrt(Σ_l ‖O_l − Ô_l‖² / Σ_l ‖O_l‖²). */
  pooled: number;
  /** Largest per-layer error. */
  max: number;
}

/** Options of {@link attentionOutputError}. */
export interface AttentionErrorOptions {
  /**
   * Post-RoPE queries per layer, [n_q, H, d], of the **last** n_q tokens of the cache (default:
   * `original.queries`, which `LlamaModel.prefill(…, { observationWindow })` and KV dumps carry).
   */
  queries?: tf.Tensor3D[];
  /** Use only the last `count` query rows (default: all). */
  count?: number;
}

/** Σ (a − b)² and Σ a² in float64 over two equal-length arrays. */
function sums(a: ArrayLike<number>, b: ArrayLike<number>): ErrorSums {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    const x = a[i];
    const e = x - b[i];
    num += e * e;
    den += x * x;
  }
  return { num, den };
}

/**
 * Attention-output error of a compressed cache, with the model's real queries: per layer,
 * O = softmax(q·Kᵀ/√d)·V over the exact prefill cache (pre-RoPE keys rotated at their positions,
 * values as given) and Ô the same over the compressed cache (`compressed.attend` when it has one,
 * else core `attention` over `compressed.keys/values`), with GQA and a causal mask among the query
 * rows; the error is ‖O − Ô‖_F / ‖O‖_F per layer, pooled over layers as sqrt(Σ num / Σ den).
 *
 * The query rows are the prompt's last n_q tokens, so they are the cache's own last n_q tokens: row
 * i sees every cached token up to its own position (`causalTail` n_q on both sides). Eviction
 * strategies here keep the most recent tokens (StreamingLLM's window, SnapKV's observation window),
 * so the mask stays right for them as long as n_q ≤ that window. Unlike a reconstruction error, it is
 * defined for eviction and merging too: it measures what attention reads from the cache.
 *
 * Call it on a freshly compressed cache, before decode tokens are appended.
 * @param original the prefill cache `compressed` was made from ([T, H_kv, d] pre-RoPE keys, values)
 * @param compressed its compressed form
 * @throws KvpackError('config') when there are no queries or `count` is out of range;
 *         KvpackError('shape' | 'layout') when the queries or caches disagree with the layout.
 */
export async function attentionOutputError(original: KVCache, compressed: CompressedCache, options: AttentionErrorOptions = {}): Promise<AttentionOutputError> {
  const L = original.layout.nLayers;
  const { nHeads: H, headDim: d } = original.layout;
  const queries = options.queries ?? original.queries;
  check(
    queries && queries.length > 0,
    'config',
    'attention-output error needs post-RoPE queries ([n_q, H, d] per layer): prefill with observationWindow > 0, or use a KV dump that stores queries',
  );
  check(queries.length === L, 'layout', `attention-output error: queries cover ${queries.length} layers, the cache has ${L}`);
  check(compressed.layout.nLayers === L, 'layout', `attention-output error: the compressed cache has ${compressed.layout.nLayers} layers, the prefill cache ${L}`);
  const T = original.keys[0].shape[0];
  const rows = queries[0].shape[0];
  const n = options.count ?? rows;
  check(Number.isInteger(n) && n >= 1 && n <= rows, 'config', `attention-output error: count ${n} must be an integer in [1, ${rows}] (query rows available)`);
  check(n <= T, 'config', `attention-output error: ${n} query rows but only ${T} cached tokens`);
  const start = original.startPosition ?? 0;
  const perLayerSums: ErrorSums[] = [];
  for (let l = 0; l < L; l++) {
    const qAll = queries[l];
    check(
      qAll.rank === 3 && qAll.shape[0] === rows && qAll.shape[1] === H && qAll.shape[2] === d,
      'shape',
      `attention-output error: queries of layer ${l} are [${qAll.shape}], expected [${rows}, ${H}, ${d}]`,
    );
    const q = n === rows ? qAll : (tf.slice(qAll, [rows - n, 0, 0], [n, H, d]) as tf.Tensor3D);
    try {
      const exact = tf.tidy(() => attention(q, applyRope(original.keys[l], original.rope, { start, count: T }), original.values[l], n));
      const approx = compressed.attend
        ? compressed.attend(l, q, { causalTail: n })
        : tf.tidy(() => attention(q, compressed.keys(l), compressed.values(l), n));
      try {
        check(
          approx.shape.length === 3 && approx.shape.every((s, i) => s === exact.shape[i]),
          'shape',
          `attention-output error: the compressed cache's attention output of layer ${l} is [${approx.shape}], expected [${exact.shape}]`,
        );
        const [a, b] = await Promise.all([exact.data(), approx.data()]);
        perLayerSums.push(sums(a, b));
      } finally {
        tf.dispose([exact, approx]);
      }
    } finally {
      if (q !== qAll) q.dispose();
    }
  }
  const perLayer = perLayerSums.map(relativeError);
  const tot = perLayerSums.reduce((a, s) => ({ num: a.num + s.num, den: a.den + s.den }), { num: 0, den: 0 });
  return { queries: n, perLayerSums, perLayer, pooled: relativeError(tot), max: Math.max(...perLayer) };
}
