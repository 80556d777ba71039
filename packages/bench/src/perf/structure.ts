import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, check, matmul, truncatedSvd, validateKVCache, type KVCache } from '@kvpack/core';

/**
 * Structure measurements of KV caches — the properties xKV relies on (Chang et al. 2025, arXiv
 * 2503.18893, §2: low-rank per-layer caches, top singular subspaces aligned across adjacent layers
 * although per-token cosine similarity across layers is low) and the outlier key channels KIVI
 * describes (Liu et al. 2024, arXiv 2402.02750, §3).
 */

/** Exact decompositions for features ≤ this; randomized (oversample 16, 2 power iterations) above. */
const EXACT_MAX_FEATURES = 256;

/** Singular spectrum summary of one [T, F] matrix. */
export interface SpectrumSummary {
  /** ‖X‖²_F. */
  totalEnergy: number;
  /** Leading singular values (as many as computed), descending. */
  singularValues: Float64Array;
  /** Orthonormal top left singular vectors [T, k] (when asked for), owned by the caller. */
  basis: tf.Tensor2D | null;
}

/**
 * Leading singular values of X [T, F] (and the top-`keepBasis` left singular vectors): exact
 * (truncatedSvd with `exact`) when F ≤ 256, else the randomized truncatedSvd at rank `rank` with
 * oversampling 16 and 2 power iterations (Halko et al. 2011), accurate to well under 1% of the
 * energy for decaying spectra.
 * @throws KvpackError('rank') when rank is not in [1, min(T, F)].
 */
export async function leadingSpectrum(X: tf.Tensor2D, rank: number, keepBasis = 0): Promise<SpectrumSummary> {
  const [T, F] = X.shape;
  const m = Math.min(T, F);
  check(Number.isInteger(rank) && rank >= 1 && rank <= m, 'rank', `leadingSpectrum: rank ${rank} must be an integer in [1, min(T=${T}, F=${F}) = ${m}]`);
  check(keepBasis <= rank, 'rank', `leadingSpectrum: keepBasis ${keepBasis} exceeds rank ${rank}`);
  const exact = F <= EXACT_MAX_FEATURES;
  const f = await truncatedSvd(X, { rank, exact, oversample: 16, powerIters: 2, seed: 7 });
  const tot = tf.tidy(() => tf.sum(tf.square(X)));
  const totalEnergy = (await tot.data())[0];
  tot.dispose();
  if (!f.singularValues) {
    tf.dispose([f.basis, f.coeffs]);
    throw new KvpackError('unsupported', 'leadingSpectrum: truncatedSvd returned no singular values (it needs oversample > 0)');
  }
  const basis = keepBasis > 0 ? (tf.slice(f.basis, [0, 0], [T, keepBasis]) as tf.Tensor2D) : null;
  tf.dispose([f.basis, f.coeffs]);
  return { totalEnergy, singularValues: f.singularValues, basis };
}

/** Fraction of ‖X‖²_F in the top-r singular directions, from a {@link SpectrumSummary}. */
export function energyFraction(s: SpectrumSummary, r: number): number {
  check(r <= s.singularValues.length, 'rank', `energyFraction: rank ${r} > ${s.singularValues.length} computed singular values`);
  let e = 0;
  for (let j = 0; j < r; j++) e += s.singularValues[j] ** 2;
  return s.totalEnergy > 0 ? Math.min(1, e / s.totalEnergy) : 0;
}

/**
 * Power-law exponent α of the singular values, σ_j ∝ (j+1)^(−α): least-squares slope of log σ_j
 * against log(j+1) over j in [0, n), with zero singular values left out.
 */
export function decayExponent(singularValues: ArrayLike<number>, n = singularValues.length): number {
  const xs: number[] = [];
  const ys: number[] = [];
  for (let j = 0; j < Math.min(n, singularValues.length); j++) {
    if (singularValues[j] > 0) {
      xs.push(Math.log(j + 1));
      ys.push(Math.log(singularValues[j]));
    }
  }
  if (xs.length < 2) return NaN;
  const mx = xs.reduce((a, b) => a + b, 0) / xs.length;
  const my = ys.reduce((a, b) => a + b, 0) / ys.length;
  let sxy = 0;
  let sxx = 0;
  for (let i = 0; i < xs.length; i++) {
    sxy += (xs[i] - mx) * (ys[i] - my);
    sxx += (xs[i] - mx) ** 2;
  }
  return -sxy / sxx;
}

/**
 * Alignment of two k-dimensional subspaces with orthonormal bases A, B [T, k]: the mean squared
 * cosine of their principal angles, ‖AᵀB‖²_F / k (1 = same subspace; ≈ k/T for random subspaces).
 * @throws KvpackError('shape') when the shapes differ.
 */
export async function subspaceAlignment(A: tf.Tensor2D, B: tf.Tensor2D): Promise<number> {
  check(A.shape[0] === B.shape[0] && A.shape[1] === B.shape[1], 'shape', `subspaceAlignment: bases [${A.shape}] and [${B.shape}] differ`);
  const s = tf.tidy(() => tf.sum(tf.square(matmul(A, B, true, false))));
  const v = (await s.data())[0];
  s.dispose();
  return v / A.shape[1];
}

/**
 * Mean cosine similarity between the same token's vectors in two layers, per KV head:
 * mean over t, h of ⟨a[t,h], b[t,h]⟩ / (‖a[t,h]‖·‖b[t,h]‖) for a, b [T, H_kv, d] (zero vectors count 0).
 * @throws KvpackError('shape') when the shapes differ.
 */
export async function tokenCosine(a: tf.Tensor3D, b: tf.Tensor3D): Promise<number> {
  check(a.shape.join() === b.shape.join(), 'shape', `tokenCosine: [${a.shape}] and [${b.shape}] differ`);
  const m = tf.tidy(() => {
    const dot = tf.sum(tf.mul(a, b), 2);
    const na = tf.sqrt(tf.sum(tf.square(a), 2));
    const nb = tf.sqrt(tf.sum(tf.square(b), 2));
    const den = tf.mul(na, nb);
    const cos = tf.where(tf.greater(den, 0), tf.div(dot, tf.maximum(den, 1e-30)), tf.zerosLike(den));
    return tf.mean(cos);
  });
  const v = (await m.data())[0];
  m.dispose();
  return v;
}

/**
 * Channel outlier ratio of x [T, H_kv, d]: max over the H_kv·d channels of the channel's RMS over
 * tokens, divided by the median channel RMS (1 when every channel has the same scale).
 */
export async function channelOutlierRatio(x: tf.Tensor3D): Promise<number> {
  const [T, H, d] = x.shape;
  const r = tf.tidy(() => tf.sqrt(tf.mean(tf.square(tf.reshape(x, [T, H * d])), 0)));
  const rms = Float64Array.from((await r.data()) as Float32Array);
  r.dispose();
  const sorted = [...rms].sort((p, q) => p - q);
  const n = sorted.length;
  const med = n % 2 ? sorted[n >> 1] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  return med > 0 ? sorted[n - 1] / med : Infinity;
}

/** Options of {@link cacheStructure}. */
export interface StructureOptions {
  /** Ranks, as fractions of F = H_kv·d, at which to report captured energy (default 1/16, 1/8, 1/4). */
  energyRanks?: number[];
  /** k of the adjacent-layer subspace alignment (default 16, as rulermini-19m's PROVENANCE). */
  alignK?: number;
  /** Layers to measure (default all); adjacent pairs are taken among consecutive measured layers. */
  maxLayers?: number;
}

/** Per-kind averages over layers (and adjacent-layer pairs). */
export interface KindStructure {
  /** Captured energy at each rank of `ranks`, mean over layers. */
  energy: number[];
  /** Fitted power-law exponent of the singular values over the top F/4, mean over layers. */
  decay: number;
  /** Adjacent-layer top-k subspace alignment, mean over pairs. */
  alignment: number;
  /** Adjacent-layer per-token cosine, mean over pairs. */
  tokenCosine: number;
  /** Channel outlier ratio (max/median channel RMS), mean over layers. */
  outlierRatio: number;
}

/** Structure of one cache, as measured by {@link cacheStructure}. */
export interface CacheStructure {
  /** Source name, e.g. "rulermini-19m" or "synthetic". */
  source: string;
  tokens: number;
  layers: number;
  /** Features per layer, H_kv·d. */
  features: number;
  /** Ranks (absolute) at which energy is reported. */
  ranks: number[];
  /** Rank fractions of F those ranks came from. */
  rankFractions: number[];
  alignK: number;
  /** Alignment of two random k-dim subspaces of R^T: k/T. */
  alignChance: number;
  keys: KindStructure;
  values: KindStructure;
}

/**
 * Measures a cache's low-rank structure on pre-RoPE keys and on values: captured energy at ranks
 * F/16, F/8, F/4 and a fitted decay exponent ({@link leadingSpectrum}), adjacent-layer alignment
 * of the top-k left (token) singular subspaces ({@link subspaceAlignment}), adjacent-layer per-token
 * cosine ({@link tokenCosine}) and the channel outlier ratio ({@link channelOutlierRatio}).
 * @throws KvpackError from validateKVCache for a bad cache; ('config') for fewer than 2 layers.
 */
export async function cacheStructure(cache: KVCache, source: string, opts: StructureOptions = {}): Promise<CacheStructure> {
  const T = await validateKVCache(cache);
  const L = Math.min(cache.layout.nLayers, opts.maxLayers ?? Infinity);
  check(L >= 2, 'config', `cacheStructure: needs at least 2 layers, got ${L}`);
  const F = cache.layout.nKvHeads * cache.layout.headDim;
  const fractions = opts.energyRanks ?? [1 / 16, 1 / 8, 1 / 4];
  const ranks = fractions.map((f) => Math.max(1, Math.min(Math.round(f * F), Math.min(T, F))));
  const k = Math.min(opts.alignK ?? 16, Math.min(T, F));
  const rmax = Math.max(k, ...ranks, Math.max(2, Math.floor(F / 4)));
  const kind = async (xs: tf.Tensor3D[]): Promise<KindStructure> => {
    const energy = ranks.map(() => 0);
    let decay = 0;
    let outlier = 0;
    let align = 0;
    let cos = 0;
    let prev: tf.Tensor2D | null = null;
    try {
      for (let l = 0; l < L; l++) {
        const X = tf.reshape(xs[l], [T, F]) as tf.Tensor2D;
        const s = await leadingSpectrum(X, Math.min(rmax, T, F), k);
        X.dispose();
        ranks.forEach((r, i) => (energy[i] += energyFraction(s, r) / L));
        decay += decayExponent(s.singularValues, Math.max(2, Math.floor(F / 4))) / L;
        outlier += (await channelOutlierRatio(xs[l])) / L;
        if (prev) {
          align += (await subspaceAlignment(prev, s.basis!)) / (L - 1);
          cos += (await tokenCosine(xs[l - 1], xs[l])) / (L - 1);
          prev.dispose();
        }
        prev = s.basis;
      }
    } finally {
      prev?.dispose();
    }
    return { energy, decay, alignment: align, tokenCosine: cos, outlierRatio: outlier };
  };
  return {
    source,
    tokens: T,
    layers: L,
    features: F,
    ranks,
    rankFractions: fractions,
    alignK: k,
    alignChance: k / T,
    keys: await kind(cache.keys),
    values: await kind(cache.values),
  };
}

/**
 * Markdown table comparing structures (one row per source and kind): energy at each rank fraction
 * of F, decay exponent, adjacent alignment (with its chance level k/T), adjacent per-token cosine and
 * channel outlier ratio.
 */
export function structureTable(rows: CacheStructure[]): string {
  const fr = rows[0]?.rankFractions ?? [1 / 16, 1 / 8, 1 / 4];
  const frac = (f: number) => {
    const inv = 1 / f;
    return Number.isInteger(Math.round(inv * 1000) / 1000) ? `F/${Math.round(inv)}` : `${f.toFixed(3)}F`;
  };
  const head = [
    'source',
    'T',
    'L',
    'F = H_kv·d',
    'kind',
    ...fr.map((f) => `energy @ ${frac(f)}`),
    'decay α',
    'adjacent top-k alignment (k; chance k/T)',
    'adjacent per-token cosine',
    'channel max/median RMS',
  ];
  const lines = [`| ${head.join(' | ')} |`, `| ${head.map(() => '---').join(' | ')} |`];
  for (const r of rows) {
    for (const [name, s] of [
      ['keys (pre-RoPE)', r.keys],
      ['values', r.values],
    ] as const) {
      lines.push(
        `| ${r.source} | ${r.tokens} | ${r.layers} | ${r.features} | ${name} | ${s.energy.map((e, i) => `${e.toFixed(3)} (r=${r.ranks[i]})`).join(' | ')} | ` +
          `${s.decay.toFixed(2)} | ${s.alignment.toFixed(3)} (k=${r.alignK}; ${r.alignChance.toFixed(3)}) | ${s.tokenCosine.toFixed(3)} | ${s.outlierRatio.toFixed(2)} |`,
      );
    }
  }
  return lines.join('\n');
}
