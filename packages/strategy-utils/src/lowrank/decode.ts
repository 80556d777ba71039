import * as tf from '@tensorflow/tfjs-core';
import { check, isHostBackend, matmul, ropeTableData, type CompressedCache, type ModelLayout, type RopeConfig } from '@kvpack/core';

/*
 * Decode-side machinery of the grouped low-rank cache (issue 5): fused RoPE reconstruction, full-mode
 * attention with values in the compressed domain, and the small tensor helpers the sparse mode
 * (sparse.ts) shares.
 *
 * Backend notes (tfjs 4.22, measured on the wasm backend): a plain 2-D matMul whose right operand is
 * a long-lived tensor is fast (XNNPACK packs it once); a matMul whose right operand is large and new
 * costs about as much again to pack; `slice`/`split`/`unstack` copy the WHOLE input to JS first
 * (`readSync`), `gather`, `transpose` and `reverse` are 10–100× slower per element than a multiply.
 * So the code below keeps big right operands long-lived, never slices a big tensor, and transposes
 * only small ones ([T, g·n] score blocks).
 */

/** Keys or values. */
type Kind = 'k' | 'v';

/**
 * Full-width RoPE tables for the fused rotation, [count, d] float32 each: for channel j of a head,
 * cos[t, j] = cos(p_t·θ_i) and sin[t, j] = sin(p_t·θ_i) with i the frequency of j's rotation pair
 * (i = ⌊j/2⌋ for the `interleaved` layout, i = j mod d/2 for `half`), p_t = start + t. Expanded from
 * core `ropeTableData` (float64 trig, long ranges cached on the host), so the values equal `ropeTables`'.
 */
export function fullWidthRopeTables(rope: RopeConfig, headDim: number, start: number, count: number): { cos: Float32Array; sin: Float32Array } {
  const half = headDim / 2;
  const t = ropeTableData(rope, headDim, { start, count }); // [count, d/2], float64-computed
  const cos = new Float32Array(count * headDim);
  const sin = new Float32Array(count * headDim);
  for (let p = 0; p < count; p++) {
    const o = p * headDim;
    for (let i = 0; i < half; i++) {
      const c = t.cos[p * half + i];
      const s = t.sin[p * half + i];
      const j0 = rope.layout === 'interleaved' ? 2 * i : i;
      const j1 = rope.layout === 'interleaved' ? 2 * i + 1 : i + half;
      cos[o + j0] = c;
      cos[o + j1] = c;
      sin[o + j0] = s;
      sin[o + j1] = s;
    }
  }
  return { cos, sin };
}

/**
 * The signed pair swap P [d, d] of a RoPE layout: RoPE(x) = x∘cos + (x·P)∘sin with the full-width
 * tables of {@link fullWidthRopeTables}. For `interleaved`, (x·P)[2i] = −x[2i+1] and
 * (x·P)[2i+1] = x[2i]; for `half`, (x·P)[i] = −x[i + d/2] and (x·P)[i + d/2] = x[i]
 * (Hugging Face `rotate_half`). Returned row-major as float32.
 */
export function signedPairSwap(layout: RopeConfig['layout'], headDim: number): Float32Array {
  const d = headDim;
  const half = d / 2;
  const P = new Float32Array(d * d);
  for (let i = 0; i < half; i++) {
    const a = layout === 'interleaved' ? 2 * i : i;
    const b = layout === 'interleaved' ? 2 * i + 1 : i + half;
    P[b * d + a] = -1; // (xP)[a] = −x[b]
    P[a * d + b] = 1; // (xP)[b] = x[a]
  }
  return P;
}

/**
 * Fused RoPE of a low-rank product: keys = (U·B)∘cos + (U·B)·P∘sin, [N, H_kv, d] from U [N, R],
 * B [R, H_kv·d] and the tables [N, d]. The rotated copy (U·B)·P is one more matrix product; it is
 * formed as U·B′ with B′ = B·P precomputed when R ≤ d (N·R·F flops), else as (U·B)·P on the
 * [N·H_kv, d] rows (N·F·d flops). Either way the multiply by P only permutes and negates, so the
 * result equals core `applyRope(U·B)` up to float32 rounding of the product.
 */
export function fusedRopeProduct(
  U: tf.Tensor2D,
  B: tf.Tensor2D,
  Bswapped: tf.Tensor2D | null,
  P: tf.Tensor2D,
  cos: tf.Tensor2D,
  sin: tf.Tensor2D,
  nKvHeads: number,
): tf.Tensor3D {
  const N = U.shape[0];
  const d = P.shape[0];
  return tf.tidy(() => {
    const Y = matmul(U, B);
    const YP = Bswapped ? matmul(U, Bswapped) : matmul(tf.reshape(Y, [N * nKvHeads, d]) as tf.Tensor2D, P);
    const c = tf.reshape(cos, [N, 1, d]);
    const s = tf.reshape(sin, [N, 1, d]);
    return tf.add(tf.mul(tf.reshape(Y, [N, nKvHeads, d]), c), tf.mul(tf.reshape(YP, [N, nKvHeads, d]), s)) as tf.Tensor3D;
  });
}

/** What the decode code reads from a grouped low-rank cache (tensors are the cache's own, not copies). */
export interface LowRankSource {
  readonly layout: ModelLayout;
  readonly rope: RopeConfig;
  /** Prefill tokens T. */
  readonly prefillLength: number;
  /** Position of the first prefill token. */
  readonly startPosition: number;
  /** The group token basis U_g of a layer, [T, R_g]. */
  basisOf(kind: Kind, layer: number): tf.Tensor2D;
  /** The layer factor B_l, [R_g, H_kv·d]. */
  factorOf(kind: Kind, layer: number): tf.Tensor2D;
}

/**
 * Long-lived tensors derived from a grouped low-rank cache for reconstruction and decode, built on
 * first use and kept until {@link DecodeState.dispose} (the cache disposes it): RoPE tables [T, d],
 * the pair swap P [d, d], B′ = B·P per layer (when R ≤ d), and per-KV-head factor slices [R, d].
 * They are not serialized and not counted in `byteSize()` (they are rebuilt from stored tensors).
 */
export class DecodeState {
  private tabs: { cos: tf.Tensor2D; sin: tf.Tensor2D } | null = null;
  private swap: tf.Tensor2D | null = null;
  /** Derived factors by key: B·P (`all.l`) and stacked head blocks (`stacked.kind.l`). */
  private readonly swapped = new Map<string, tf.Tensor>();
  private readonly heads = new Map<string, tf.Tensor2D[]>();
  private readonly extra: tf.Tensor[] = [];

  constructor(readonly src: LowRankSource) {}

  /** Full-width RoPE tables at the prefill positions, [T, d] each. */
  tables(): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
    if (!this.tabs) {
      const { headDim } = this.src.layout;
      const T = this.src.prefillLength;
      const { cos, sin } = fullWidthRopeTables(this.src.rope, headDim, this.src.startPosition, T);
      this.tabs = { cos: tf.keep(tf.tensor2d(cos, [T, headDim])), sin: tf.keep(tf.tensor2d(sin, [T, headDim])) };
    }
    return this.tabs;
  }

  /** The signed pair swap P [d, d]. */
  pairSwap(): tf.Tensor2D {
    if (!this.swap) {
      const d = this.src.layout.headDim;
      this.swap = tf.keep(tf.tensor2d(signedPairSwap(this.src.rope.layout, d), [d, d]));
    }
    return this.swap;
  }

  /** B′ = B·P of a layer's key factor when R ≤ d (then U·B′ is cheaper than (U·B)·P), else null. */
  swappedKeyFactor(layer: number): tf.Tensor2D | null {
    const B = this.src.factorOf('k', layer);
    const [R, F] = B.shape;
    const d = this.src.layout.headDim;
    if (R > d) return null;
    let t = this.swapped.get(`all.${layer}`) as tf.Tensor2D | undefined;
    if (!t) {
      t = tf.keep(tf.tidy(() => tf.reshape(matmul(tf.reshape(B, [R * (F / d), d]) as tf.Tensor2D, this.pairSwap()), [R, F]) as tf.Tensor2D));
      this.swapped.set(`all.${layer}`, t);
    }
    return t;
  }

  /** Per-KV-head column blocks of a factor, H_kv tensors [R, d] (B_l[:, h·d:(h+1)·d]), built once with one split. */
  headFactors(kind: Kind, layer: number): tf.Tensor2D[] {
    const key = `${kind}.${layer}`;
    let hs = this.heads.get(key);
    if (!hs) {
      const { nKvHeads } = this.src.layout;
      const src = this.src.factorOf(kind, layer);
      hs = tf.tidy(() => tf.split(src, nKvHeads, 1).map((t) => tf.keep(t as tf.Tensor2D)));
      this.heads.set(key, hs);
    }
    return hs;
  }

  /**
   * A factor's per-KV-head blocks stacked for batched products, [H_kv, R, d] (B_l reshaped [R, H_kv, d]
   * and transposed), built once: the GPU sparse decode multiplies every head's rows in one kernel.
   */
  stackedHeadFactors(kind: Kind, layer: number): tf.Tensor3D {
    const key = `stacked.${kind}.${layer}`;
    let t = this.swapped.get(key) as tf.Tensor3D | undefined;
    if (!t) {
      const { nKvHeads, headDim } = this.src.layout;
      const B = this.src.factorOf(kind, layer);
      t = tf.keep(tf.tidy(() => tf.transpose(tf.reshape(B, [B.shape[0], nKvHeads, headDim]), [1, 0, 2]) as tf.Tensor3D));
      this.swapped.set(key, t);
    }
    return t;
  }

  /** Keeps an extra derived tensor until dispose (sparse mode's per-head tensors). */
  hold<T extends tf.Tensor>(t: T): T {
    this.extra.push(tf.keep(t));
    return t;
  }

  /** Post-RoPE keys of the whole prefill of a layer, [T, H_kv, d]: the fused reconstruction. */
  keys(layer: number): tf.Tensor3D {
    const { cos, sin } = this.tables();
    return fusedRopeProduct(this.src.basisOf('k', layer), this.src.factorOf('k', layer), this.swappedKeyFactor(layer), this.pairSwap(), cos, sin, this.src.layout.nKvHeads);
  }

  /** Values of the whole prefill of a layer, [T, H_kv, d]. */
  values(layer: number): tf.Tensor3D {
    const { nKvHeads, headDim } = this.src.layout;
    return tf.tidy(() => tf.reshape(matmul(this.src.basisOf('v', layer), this.src.factorOf('v', layer)), [this.src.prefillLength, nKvHeads, headDim]) as tf.Tensor3D);
  }

  dispose(): void {
    const all: tf.Tensor[] = [...this.extra, ...this.swapped.values(), ...[...this.heads.values()].flat()];
    if (this.tabs) all.push(this.tabs.cos, this.tabs.sin);
    if (this.swap) all.push(this.swap);
    tf.dispose(all);
    this.tabs = null;
    this.swap = null;
    this.swapped.clear();
    this.heads.clear();
    this.extra.length = 0;
  }
}

/** How `attend` forms the value side: in the compressed domain, by reconstruction, or by flop count. */
export type ValuePath = 'auto' | 'compressed' | 'reconstruct';

/**
 * Multiply–accumulate counts of the two value paths of full-mode attention for q rows n over T
 * prefill tokens (H query heads, value rank R_v, F = H_kv·d, head_dim d): compressed
 * (softmax·U_v)·B_v costs H·n·T·R_v + H·n·R_v·F (the last product is formed for all KV heads at once
 * and each row keeps its head's block); reconstruction V_h = U_v·B_v[:, h] then softmax·V_h per KV
 * head costs T·R_v·F + H·n·T·d.
 */
export function valuePathFlops(n: number, H: number, T: number, Rv: number, F: number, d: number): { compressed: number; reconstruct: number } {
  return { compressed: H * n * T * Rv + H * n * Rv * F, reconstruct: T * Rv * F + H * n * T * d };
}

/** Queries of one layer, rearranged once per attend call (all tiny). */
export interface QueryBlocks {
  n: number;
  H: number;
  g: number;
  /** Per KV head h: the g·n rows of its query heads, scaled by 1/√d, [g·n, d]; row ii·n + j = head h·g + ii, query j. */
  rows: tf.Tensor2D[];
  /** The same transposed, [d, g·n] (right operands of the tall score products). */
  cols: tf.Tensor2D[];
  /** P·colsₕ, [d, g·n]: the queries' pair swap, for scores against un-rotated keys ({@link ropeScores}). */
  colsSwapped: tf.Tensor2D[];
  /** Block-diagonal [F, H·n]: column (i, j) holds query j of head i in the rows of its KV head. */
  blockDiag: tf.Tensor2D;
  /** One-hot [H_kv, 1, H_kv, 1] used to keep each KV head's block of an [H·n, F] product. */
  eye: tf.Tensor4D;
}

/**
 * Rearranges post-RoPE queries q [n, H, d] for the per-KV-head products (GQA: query head i uses KV
 * head ⌊i / g⌋, g = H / H_kv, as core `attention`). Global row order of every [H·n, ·] result: row
 * i·n + j = query j of head i. Call inside tf.tidy.
 */
export function queryBlocks(q: tf.Tensor3D, layout: ModelLayout, P: tf.Tensor2D): QueryBlocks {
  const [n, H, d] = q.shape;
  const Hkv = layout.nKvHeads;
  const g = H / Hkv;
  const scaled = tf.mul(tf.transpose(q, [1, 0, 2]), 1 / Math.sqrt(d)); // [H, n, d]
  const perHead = tf.reshape(scaled, [Hkv, g * n, d]);
  const rows = (Hkv === 1 ? [tf.reshape(perHead, [g * n, d])] : tf.unstack(perHead, 0)) as tf.Tensor2D[];
  const colsAll = tf.transpose(perHead, [0, 2, 1]); // [Hkv, d, g·n]
  const cols = (Hkv === 1 ? [tf.reshape(colsAll, [d, g * n])] : tf.unstack(colsAll, 0)) as tf.Tensor2D[];
  const colsSwapped = cols.map((c) => matmul(P, c));
  const eyeData = new Float32Array(Hkv * Hkv);
  for (let h = 0; h < Hkv; h++) eyeData[h * Hkv + h] = 1;
  const eye = tf.tensor4d(eyeData, [Hkv, 1, Hkv, 1]);
  const blockDiag = tf.reshape(tf.mul(tf.reshape(colsAll, [Hkv, d, 1, g * n]), eye), [Hkv * d, H * n]) as tf.Tensor2D;
  return { n, H, g, rows, cols, colsSwapped, blockDiag, eye };
}

/**
 * Attention scores of one KV head's queries against pre-RoPE rows y [N, d] at positions with tables
 * cos, sin [N, d], without rotating the keys: q·RoPE_t(y_t) = (y_t∘cos_t)·q + (y_t∘sin_t)·(P·q)
 * (the sin table is equal within each rotation pair, so P moves from the key to the query).
 * Returns the transposed (small) scores [g·n, N]. Saves the N·d·d product (y·P) per head.
 */
export function ropeScores(y: tf.Tensor2D, cos: tf.Tensor2D, sin: tf.Tensor2D, qb: QueryBlocks, h: number): tf.Tensor2D {
  return tf.transpose(tf.add(matmul(tf.mul(y, cos) as tf.Tensor2D, qb.cols[h]), matmul(tf.mul(y, sin) as tf.Tensor2D, qb.colsSwapped[h]))) as tf.Tensor2D;
}

/** Keeps, from W [H·n, H_kv·d], each row's own KV-head block: [H·n, d]. */
export function ownHeadBlock(W: tf.Tensor2D, qb: QueryBlocks, headDim: number): tf.Tensor2D {
  const Hkv = qb.eye.shape[0];
  const gn = qb.g * qb.n;
  return tf.reshape(tf.sum(tf.mul(tf.reshape(W, [Hkv, gn, Hkv, headDim]), qb.eye), 2), [Hkv * gn, headDim]) as tf.Tensor2D;
}

/**
 * Additive causal masks of the residual (decode) tokens for query rows: with N cached tokens of which
 * the last `tail` are the queries' own, query j sees cached token u iff u ≤ N − tail + j. Returns the
 * masks of the prefill part [n, T] and of the residual part [n, n_dec] (null when nothing is masked).
 */
export function causalParts(n: number, T: number, nDec: number, tail: number): { pre: Float32Array | null; res: Float32Array | null } {
  const N = T + nDec;
  const masked = tail > 0 && (n > 1 || tail < n);
  if (!masked) return { pre: null, res: null };
  let pre: Float32Array | null = null;
  const res = nDec > 0 ? new Float32Array(n * nDec) : null;
  for (let j = 0; j < n; j++) {
    const last = N - tail + j; // inclusive
    for (let u = Math.max(0, last + 1); u < N; u++) {
      if (u < T) {
        pre ??= new Float32Array(n * T);
        pre[j * T + u] = -1e30;
      } else res![j * nDec + (u - T)] = -1e30;
    }
  }
  return { pre, res };
}

/** Adds an [n, M] mask to scores [H·n, M] (rows i·n + j) — broadcast over the H query heads. */
export function addRowMask(S: tf.Tensor2D, mask: Float32Array | null, n: number): tf.Tensor2D {
  if (!mask) return S;
  const [Hn, M] = S.shape;
  return tf.reshape(tf.add(tf.reshape(S, [Hn / n, n, M]), tf.tensor3d(mask, [1, n, M])), [Hn, M]) as tf.Tensor2D;
}

/**
 * Full-mode attention of post-RoPE queries q [n, H, d] over one layer of a grouped low-rank cache
 * plus its exact residual decode tokens: softmax(q·Kᵀ/√d + causal mask)·V with
 * - keys: per KV head h, the pre-RoPE rows Y_h = U_k·B_k[:, h] and the scores
 *   (Y_h∘cos)·q_hᵀ + (Y_h∘sin)·(P·q_h)ᵀ as tall [T, g·n] products ({@link ropeScores}: the rotation
 *   moves to the queries, the keys are never materialized);
 * - values: in the compressed domain, (softmax·U_v)·B_v, or by reconstruction, chosen by
 *   {@link valuePathFlops} unless `values` forces one;
 * - residual tokens [n_dec, H_kv, d] (exact) attended together with the prefill (one softmax).
 * Returns [n, H, d]. The result equals core `attention(q, keys(l), values(l), tail)` up to float32
 * rounding (tested).
 */
export function attendFull(
  state: DecodeState,
  layer: number,
  q: tf.Tensor3D,
  tail: number,
  residual: { k: tf.Tensor3D; v: tf.Tensor3D } | null,
  values: ValuePath = 'auto',
): tf.Tensor3D {
  const src = state.src;
  const { nKvHeads: Hkv, headDim: d } = src.layout;
  const T = src.prefillLength;
  const F = Hkv * d;
  return tf.tidy(() => {
    const qb = queryBlocks(q, src.layout, state.pairSwap());
    const { n, H } = qb;
    const nDec = residual ? residual.k.shape[0] : 0;
    const masks = causalParts(n, T, nDec, tail);
    const { cos, sin } = state.tables();
    const Uk = src.basisOf('k', layer);
    const Bh = state.headFactors('k', layer);
    // Residual (exact decode) tokens: scores of all heads at once through the block-diagonal queries.
    const Sres =
      residual && nDec > 0
        ? addRowMask(tf.transpose(matmul(tf.reshape(residual.k, [nDec, F]) as tf.Tensor2D, qb.blockDiag)) as tf.Tensor2D, masks.res, n)
        : null;
    const resRows = Sres ? (Hkv === 1 ? [Sres] : (tf.split(Sres, Hkv, 0) as tf.Tensor2D[])) : null;
    const Uv = src.basisOf('v', layer);
    const Rv = Uv.shape[1];
    const fl = valuePathFlops(n, H, T, Rv, F, d);
    const path = values === 'auto' ? (fl.compressed <= fl.reconstruct ? 'compressed' : 'reconstruct') : values;
    const Bvh = path === 'reconstruct' ? state.headFactors('v', layer) : null;
    // Per KV head: prefill scores against the un-rotated rows U_k·B_k[:, h] ({@link ropeScores}), one
    // softmax with the head's residual scores.
    const E: tf.Tensor2D[] = [];
    const Er: tf.Tensor2D[] = [];
    const zs: tf.Tensor2D[] = [];
    const outs: tf.Tensor2D[] = [];
    for (let h = 0; h < Hkv; h++) {
      const S = addRowMask(ropeScores(matmul(Uk, Bh[h]), cos, sin, qb, h), masks.pre, n);
      let m = tf.max(S, 1, true);
      if (resRows) m = tf.maximum(m, tf.max(resRows[h], 1, true));
      const e = tf.exp(tf.sub(S, m)) as tf.Tensor2D;
      let z = tf.sum(e, 1, true);
      if (resRows) {
        const er = tf.exp(tf.sub(resRows[h], m)) as tf.Tensor2D;
        z = tf.add(z, tf.sum(er, 1, true));
        Er.push(er);
      }
      zs.push(z as tf.Tensor2D);
      if (Bvh) outs.push(matmul(e, matmul(Uv, Bvh[h]))); // softmax·(U_v·B_v[:, h]), [g·n, d]
      else E.push(e);
    }
    const cat = (xs: tf.Tensor2D[]) => (xs.length === 1 ? xs[0] : (tf.concat(xs, 0) as tf.Tensor2D));
    let out = Bvh
      ? cat(outs)
      : ownHeadBlock(matmul(matmul(cat(E), Uv), src.factorOf('v', layer)), qb, d); // (softmax·U_v)·B_v, own head's block
    if (Er.length) out = tf.add(out, ownHeadBlock(matmul(cat(Er), tf.reshape(residual!.v, [nDec, F]) as tf.Tensor2D), qb, d)) as tf.Tensor2D;
    const z = cat(zs);
    return tf.transpose(tf.reshape(tf.div(out, z), [H, n, d]), [1, 0, 2]) as tf.Tensor3D;
  });
}

/** Median timings of {@link decodeStepTimes}, in ms. */
export interface DecodeStepTimes {
  /** `keys(layer)`: post-RoPE keys of the layer, [N, H_kv, d]. */
  reconstructKeysMs: number;
  /** `values(layer)`. */
  reconstructValuesMs: number;
  /** One `attend(layer, q)` call (the cache's decode mode). */
  attendMs: number;
}

/**
 * Times reconstruction and one decode step of a compressed cache at one layer: the median over
 * `repeats` runs after `warmup` untimed runs (which also build any derived tensors). On wasm/cpu the
 * kernels run synchronously; on other backends each run waits for its result (`data()` of a 1-element
 * reduction). For the perf suite; not a test (no assertion). `q` is post-RoPE, [n, H, d].
 * @throws KvpackError('unsupported') when the cache has no `attend`.
 */
export async function decodeStepTimes(
  cache: CompressedCache,
  q: tf.Tensor3D,
  opts: { layer?: number; repeats?: number; warmup?: number } = {},
): Promise<DecodeStepTimes> {
  const layer = opts.layer ?? 0;
  const reps = opts.repeats ?? 5;
  const warm = opts.warmup ?? 1;
  check(typeof cache.attend === 'function', 'unsupported', `decodeStepTimes: ${cache.strategy} cache has no attend()`);
  const time = async (f: () => tf.Tensor): Promise<number> => {
    const ts: number[] = [];
    for (let i = 0; i < warm + reps; i++) {
      const t0 = performance.now();
      const r = f();
      if (!isHostBackend()) {
        const s = tf.sum(r);
        await s.data();
        s.dispose();
      }
      const dt = performance.now() - t0;
      r.dispose();
      if (i >= warm) ts.push(dt);
    }
    ts.sort((a, b) => a - b);
    return ts[Math.floor(ts.length / 2)];
  };
  return {
    reconstructKeysMs: await time(() => cache.keys(layer)),
    reconstructValuesMs: await time(() => cache.values(layer)),
    attendMs: await time(() => cache.attend!(layer, q)),
  };
}
