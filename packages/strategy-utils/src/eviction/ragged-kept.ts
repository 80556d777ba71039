import * as tf from '@tensorflow/tfjs-core';
import {
  BaseCompressedCache,
  HalfTensor,
  applyRope,
  causalTailMask,
  check,
  type AttendOptions,
  type KVCache,
  type ModelLayout,
  type RopeConfig,
  type StoredItem,
  type StoredReader,
} from '@kvpack/core';

/**
 * Bytes a {@link RaggedKeptCache} holds right after compress when it keeps `rows` token rows over all
 * layers and KV heads: float16 keys and values, rows · d · 2 · 2, the int32 positions, rows · 4, and
 * the int32 per-head counts, L · H_kv · 4.
 */
export function raggedKeptBytes(layout: ModelLayout, rows: number): number {
  return rows * (4 * layout.headDim + 4) + layout.nLayers * layout.nKvHeads * 4;
}

/**
 * A cache that keeps a different number of prefill tokens per KV head (head-wise budgets, as AdaKV).
 * Per layer it stores exactly the kept rows, ragged, nothing padded: float16 post-RoPE keys and values
 * [N, d] with N = Σ_h n_h (head 0's rows, then head 1's, …, each in ascending position order), the
 * kept positions int32 [N] and the per-head counts int32 [H_kv] — so `byteSize()` counts
 * N·d·2·2 + N·4 + H_kv·4 bytes per layer. Only the float16 rows are held on the backend.
 *
 * `keys(layer)` / `values(layer)` give [n_max + r, H_kv, d]: each head's kept rows, then zero rows up
 * to the longest head's n_max, then the r decode tokens. A plain softmax over those rows would give
 * the padding weight, so {@link attend} (which the model runner and the bench call when a cache has
 * one) masks each head's padding: it equals attention over exactly the kept tokens of each head.
 */
export class RaggedKeptCache extends BaseCompressedCache {
  constructor(
    readonly strategy: string,
    layout: ModelLayout,
    rope: RopeConfig,
    prefillLength: number,
    readonly options: unknown,
    private readonly k: HalfTensor[],
    private readonly v: HalfTensor[],
    /** Per layer, kept positions [N], head-major. */
    private readonly positions: Int32Array[],
    /** Per layer, tokens kept per KV head [H_kv]. */
    private readonly counts: Int32Array[],
  ) {
    super(layout, rope, prefillLength);
  }

  /** Tokens kept per KV head of a layer, [H_kv]. */
  headCounts(layer: number): Int32Array {
    this.assertLive(layer);
    return Int32Array.from(this.counts[layer]);
  }

  /** Kept prefill positions of one KV head of a layer, ascending. */
  keptPositions(layer: number, head: number): Int32Array {
    this.assertLive(layer);
    const c = this.counts[layer];
    check(Number.isInteger(head) && head >= 0 && head < c.length, 'shape', `head ${head} is out of range [0, ${c.length})`);
    let off = 0;
    for (let h = 0; h < head; h++) off += c[h];
    return this.positions[layer].slice(off, off + c[head]);
  }

  protected prefillTokens(layer: number): number {
    return Math.max(...this.counts[layer]);
  }

  /** [n_max, H_kv] int32 rows of the flat [N + 1, d] store (row N: the zero pad) and the padding mask [H_kv, n_max] (1 = kept). */
  private slots(layer: number): { rows: tf.Tensor2D; kept: tf.Tensor2D } {
    const c = this.counts[layer];
    const H = c.length;
    const nMax = this.prefillTokens(layer);
    const N = this.positions[layer].length;
    const offsets = new Int32Array(H);
    for (let h = 1; h < H; h++) offsets[h] = offsets[h - 1] + c[h - 1];
    return tf.tidy(() => {
      const j = tf.reshape(tf.range(0, nMax, 1, 'int32'), [nMax, 1]);
      const kept = tf.less(j, tf.tensor2d(c, [1, H], 'int32')); // [n_max, H]
      const rows = tf.where(kept, tf.add(j, tf.tensor2d(offsets, [1, H], 'int32')), tf.fill([nMax, H], N, 'int32'));
      return { rows: rows as tf.Tensor2D, kept: tf.transpose(tf.cast(kept, 'float32')) as tf.Tensor2D };
    });
  }

  private padded(layer: number, h: HalfTensor): tf.Tensor3D {
    const H = this.layout.nKvHeads;
    const d = this.layout.headDim;
    const nMax = this.prefillTokens(layer);
    return tf.tidy(() => {
      const { rows } = this.slots(layer);
      const flat = tf.concat([h.unpack() as tf.Tensor2D, tf.zeros([1, d])], 0);
      return tf.reshape(tf.gather(flat, tf.reshape(rows, [nMax * H])), [nMax, H, d]) as tf.Tensor3D;
    });
  }

  protected prefillKeys(layer: number): tf.Tensor3D {
    return this.padded(layer, this.k[layer]);
  }
  protected prefillValues(layer: number): tf.Tensor3D {
    return this.padded(layer, this.v[layer]);
  }

  /**
   * Attention over each head's kept prefill tokens and the decode tokens: softmax(q·Kᵀ/√d + mask)·V
   * with the padding rows of each KV head masked out and the causal tail as core `attention`.
   * @param queries post-RoPE [n, H, d] @returns [n, H, d]
   */
  override attend(layer: number, queries: tf.Tensor3D, options?: AttendOptions): tf.Tensor3D {
    this.assertLive(layer);
    const [n, Hq, d] = queries.shape;
    const H = this.layout.nKvHeads;
    const g = Hq / H;
    const tail = options?.causalTail ?? n;
    return tf.tidy(() => {
      const k = this.keys(layer);
      const v = this.values(layer);
      const N = k.shape[0];
      const nMax = this.prefillTokens(layer);
      const { kept } = this.slots(layer); // [H, n_max]
      const valid = N > nMax ? tf.concat([kept, tf.ones([H, N - nMax])], 1) : kept; // [H, N]
      let mask = tf.reshape(tf.mul(tf.sub(1, valid), -1e30), [H, 1, 1, N]);
      if (tail > 0 && (n > 1 || tail < n)) mask = tf.add(mask, tf.reshape(causalTailMask(n, N, tail), [1, n, 1, N]));
      const qh = tf.reshape(tf.transpose(tf.reshape(queries, [n, H, g, d]), [1, 0, 2, 3]), [H, n * g, d]);
      const kT = tf.transpose(k, [1, 2, 0]); // [H, d, N]
      const s = tf.add(tf.reshape(tf.mul(tf.matMul(qh, kT), 1 / Math.sqrt(d)), [H, n, g, N]), mask);
      const p = tf.reshape(tf.softmax(s, -1), [H, n * g, N]);
      const o = tf.reshape(tf.matMul(p, tf.transpose(v, [1, 0, 2])), [H, n, g, d]);
      return tf.reshape(tf.transpose(o, [1, 0, 2, 3]), [n, Hq, d]) as tf.Tensor3D;
    });
  }

  protected stored(): StoredItem[] {
    return this.k.flatMap((k, l): StoredItem[] => [
      { name: `k.${l}`, half: k },
      { name: `v.${l}`, half: this.v[l] },
      { name: `pos.${l}`, dtype: 'int32', shape: [this.positions[l].length], data: this.positions[l] },
      { name: `count.${l}`, dtype: 'int32', shape: [this.counts[l].length], data: this.counts[l] },
    ]);
  }
  protected disposeStored(): void {
    for (const h of [...this.k, ...this.v]) h.dispose();
  }

  /**
   * Builds the cache layer by layer: the keys are rotated once (at startPosition + i), `select` picks
   * the kept tokens from them as flat indices h·T + t ascending (int32 [N] on the backend, handed
   * over: disposed here), or null to keep every token of every head; the kept rows are gathered on
   * the backend and packed to float16. The indices come back to the host (one small readback per
   * layer: the positions and counts are stored there).
   */
  static async fromSelection(
    strategy: string,
    options: unknown,
    cache: KVCache,
    T: number,
    select: (layer: number, postKeys: tf.Tensor3D) => Promise<tf.Tensor1D | null> | tf.Tensor1D | null,
  ): Promise<RaggedKeptCache> {
    const { nKvHeads: H, nLayers: L, headDim: d } = cache.layout;
    const k: HalfTensor[] = [];
    const v: HalfTensor[] = [];
    const positions: Int32Array[] = [];
    const counts: Int32Array[] = [];
    try {
      for (let l = 0; l < L; l++) {
        const post = applyRope(cache.keys[l], cache.rope, { start: cache.startPosition ?? 0, count: T }) as tf.Tensor3D;
        try {
          const flat = (await select(l, post)) ?? tf.range(0, H * T, 1, 'int32');
          try {
            const N = flat.shape[0];
            // Row of token t of head h in x viewed as [T·H, d]: t·H + h.
            const rows = tf.tidy(() => tf.add(tf.mul(tf.mod(flat, tf.scalar(T, 'int32')), tf.scalar(H, 'int32')), tf.floorDiv(flat, tf.scalar(T, 'int32'))));
            const gather = (x: tf.Tensor3D) => tf.tidy(() => tf.gather(tf.reshape(x, [T * H, d]), rows));
            try {
              for (const [src, dst] of [
                [post, k],
                [cache.values[l], v],
              ] as const) {
                const g = gather(src);
                try {
                  dst.push(await HalfTensor.fromTensor(g));
                } finally {
                  g.dispose();
                }
              }
            } finally {
              rows.dispose();
            }
            const idx = (await flat.data()) as Int32Array;
            const c = new Int32Array(H);
            const p = new Int32Array(N);
            for (let i = 0; i < N; i++) {
              c[Math.floor(idx[i] / T)]++;
              p[i] = idx[i] % T;
            }
            positions.push(p);
            counts.push(c);
          } finally {
            flat.dispose();
          }
        } finally {
          post.dispose();
        }
      }
      return new RaggedKeptCache(strategy, cache.layout, cache.rope, T, options, k, v, positions, counts);
    } catch (e) {
      for (const h of [...k, ...v]) h.dispose();
      throw e;
    }
  }

  /**
   * Restores a serialized cache of `strategy`; `expectTotal(layer)` gives the tokens the options keep
   * in that layer over all heads (N), checked against the file; without it N is read from the file
   * (allocations that depend on the scores: check the totals after).
   * @throws KvpackError('corrupt') when counts, positions and rows disagree, a position is outside [0, T) or a head's positions are not ascending.
   */
  static restore(r: StoredReader, strategy: string, options: unknown, expectTotal?: (layer: number) => number): RaggedKeptCache {
    const { layout, rope, prefillLength: T } = r.header;
    const { nKvHeads: H, headDim: d } = layout;
    const k: HalfTensor[] = [];
    const v: HalfTensor[] = [];
    const positions: Int32Array[] = [];
    const counts: Int32Array[] = [];
    const bad = (l: number, what: string) => `serialized ${strategy} cache is corrupt: layer ${l} ${what}`;
    try {
      for (let l = 0; l < layout.nLayers; l++) {
        const N = expectTotal ? expectTotal(l) : r.shape(`pos.${l}`, { dtype: 'int32', shape: [null] })[0];
        const c = r.host<Int32Array>(`count.${l}`, { dtype: 'int32', shape: [H] });
        const p = r.host<Int32Array>(`pos.${l}`, { dtype: 'int32', shape: [N] });
        check(c.every((x) => x >= 0 && x <= T) && c.reduce((a, b) => a + b, 0) === N, 'corrupt', bad(l, `keeps ${N} tokens but its per-head counts [${c}] disagree`));
        let off = 0;
        for (let h = 0; h < H; h++) {
          for (let j = 0; j < c[h]; j++) {
            const t = p[off + j];
            check(t >= 0 && t < T && (j === 0 || t > p[off + j - 1]), 'corrupt', bad(l, `head ${h}: positions are not ascending in [0, ${T})`));
          }
          off += c[h];
        }
        k.push(r.half(`k.${l}`, { shape: [N, d] }));
        v.push(r.half(`v.${l}`, { shape: [N, d] }));
        positions.push(p);
        counts.push(c);
      }
    } catch (e) {
      for (const h of [...k, ...v]) h.dispose();
      throw e;
    }
    return new RaggedKeptCache(strategy, layout, rope, T, options, k, v, positions, counts);
  }
}
