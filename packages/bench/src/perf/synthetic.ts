import * as tf from '@tensorflow/tfjs-core';
import { applyRope, check, normalPair, type KVCache, type ModelLayout, type RopeConfig } from '@kvpack/core';

/**
 * Llama-3.1-8B's attention layout: 32 layers, 32 query heads, 8 KV heads (GQA 4:1), head_dim 128
 * (meta-llama/Llama-3.1-8B `config.json`).
 */
export const LLAMA31_8B_LAYOUT: Readonly<ModelLayout> = Object.freeze({ nLayers: 32, nHeads: 32, nKvHeads: 8, headDim: 128 });

/**
 * Llama-3.1-8B's RoPE: theta 500,000, Hugging Face rotate-half layout, `llama3` frequency scaling
 * (factor 8, low/high frequency factors 1 and 4, original context 8,192).
 */
export const LLAMA31_8B_ROPE: Readonly<RopeConfig> = Object.freeze<RopeConfig>({
  theta: 500000,
  layout: 'half',
  scaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
});

/**
 * Structure of the synthetic keys or values of every layer. Per layer l the cache is
 *
 *   X_l = s · Z_l · W_l · diag(g_l),   W_l = diag(σ) · V_lᵀ with outlier loadings     ([T, F], F = H_kv · d)
 *
 * - **Spectrum** σ (length F, Σσ² = 1): σ_j² = (1 − noise) · (j+1)^(−2·decay) / Σ_i (i+1)^(−2·decay)
 *   + noise / F — a power law (singular values ∝ j^(−decay)) over an isotropic floor holding the
 *   fraction `noise` of the energy.
 * - **Token factors** Z_l [T, F], zero-mean, unit variance: Z_0 = E_0 and, column by column,
 *   Z_l[:, j] = a_j · Z_{l−1}[:, j] + √(1 − a_j²) · E_l[:, j] with fresh draws E_l and
 *   a_j = coupling · (j+1)^(−couplingDecay). Adjacent layers thus share their token subspace (the
 *   top-k left singular subspaces align at ≈ mean a_j² + (1 − a_j²)·k/T, see
 *   {@link plantedAlignment}) — the observation xKV builds on.
 * - **Channel mixing** V_l [F, F] orthonormal: the Sylvester–Hadamard matrix / √F (F a power of 2;
 *   otherwise the orthonormal DCT-II basis) with its rows permuted and sign-flipped at random per
 *   layer. Different layers mix the same token factors into unrelated channel directions, so the
 *   cosine between a token's vectors in adjacent layers is ≈ 0 (as measured on real models), while
 *   with Hadamard mixing every channel has the same expected power.
 * - **Outlier channels**: `outlierPairs` RoPE rotation pairs per KV head (channels (p, p + d/2) for
 *   the rotate-half layout, (2p, 2p+1) for interleaved; chosen per layer) also carry one of the 8
 *   leading token factors with extra weight γ = √((outlierGain² − 1)/F): the loading W[j, c] grows
 *   to ±√(W[j, c]² + γ²) (in units of s). Their RMS is then
 *   `outlierGain` × a normal channel's ({@link plantedOutlierRatio}), and the extra energy lies in
 *   the shared leading token subspace (scaling the channels instead would put random, layer-specific
 *   combinations of all factors on top and destroy the cross-layer alignment real caches show).
 * - **Channel gains** g_l: log-normal exp(channelSpread · N(0,1)) on every channel, per layer.
 * - **Scale** s = rms · √F, so entries have RMS ≈ `rms` (before channel gains).
 */
export interface SyntheticKindParams {
  /** Power-law exponent of the singular values (σ_j ∝ (j+1)^(−decay)). */
  decay: number;
  /** Fraction of the energy in an isotropic floor, in [0, 1). */
  noise: number;
  /** Cross-layer AR(1) coefficient a of the leading token factors, in [0, 1]. */
  coupling: number;
  /** a_j = coupling · (j+1)^(−couplingDecay): later components are shared less. */
  couplingDecay: number;
  /** RoPE channel pairs per KV head with gain `outlierGain`. */
  outlierPairs: number;
  /** RMS of an outlier channel over a normal one's (≥ 1). */
  outlierGain: number;
  /** Standard deviation of the log-normal per-channel gains (0 = none). */
  channelSpread: number;
  /** RMS of the entries before channel gains. */
  rms: number;
}

/**
 * Default structure, calibrated on the real prefill caches of rulermini-19m and stories260K (see
 * `kvpack bench structure` and PERF.md): keys decay faster than values (keys are lower-rank),
 * adjacent layers share their leading token subspace, and keys have a few outlier channel pairs.
 */
export const DEFAULT_SYNTHETIC_KEYS: Readonly<SyntheticKindParams> = Object.freeze({
  decay: 1.0,
  noise: 0.02,
  coupling: 0.93,
  couplingDecay: 0.02,
  outlierPairs: 2,
  outlierGain: 3,
  channelSpread: 0.25,
  rms: 1,
});

/** Default structure of the values (see {@link DEFAULT_SYNTHETIC_KEYS}). */
export const DEFAULT_SYNTHETIC_VALUES: Readonly<SyntheticKindParams> = Object.freeze({
  decay: 0.8,
  noise: 0.05,
  coupling: 0.9,
  couplingDecay: 0.03,
  outlierPairs: 0,
  outlierGain: 1,
  channelSpread: 0.3,
  rms: 0.5,
});

/** Options of {@link syntheticLlamaCache}. */
export interface SyntheticCacheOptions {
  /** Prefill tokens T. */
  T: number;
  /** Layout (default {@link LLAMA31_8B_LAYOUT}). */
  layout?: ModelLayout;
  /** Layers to generate, overriding layout.nLayers (e.g. 4 on a CPU, where 32 × 32K do not fit). */
  layers?: number;
  /** RoPE (default {@link LLAMA31_8B_ROPE}). */
  rope?: RopeConfig;
  /** Seed of every draw (default 0). The result depends only on the seed and the options, not on `chunkTokens` or the backend. */
  seed?: number;
  /** Overrides of the key structure (default {@link DEFAULT_SYNTHETIC_KEYS}). */
  keys?: Partial<SyntheticKindParams>;
  /** Overrides of the value structure (default {@link DEFAULT_SYNTHETIC_VALUES}). */
  values?: Partial<SyntheticKindParams>;
  /** Post-RoPE queries of the last w prompt tokens per layer, [w, H, d] (for SnapKV); 0 = none (default). */
  observationWindow?: number;
  /** Tokens generated per backend step (default 4,096): bounds the transient memory. */
  chunkTokens?: number;
  /** Called after each generated chunk: (done, total) in layer-chunks. */
  onProgress?: (done: number, total: number) => void;
}

/** A synthetic cache and the structure it was planted with. */
export interface SyntheticCache extends KVCache {
  planted: { keys: SyntheticKindParams; values: SyntheticKindParams; seed: number };
}

/** Spectrum σ (Σσ² = 1, descending) of {@link SyntheticKindParams}, length F. */
export function plantedSpectrum(p: Pick<SyntheticKindParams, 'decay' | 'noise'>, F: number): Float64Array {
  const w = new Float64Array(F);
  let sum = 0;
  for (let j = 0; j < F; j++) sum += w[j] = Math.pow(j + 1, -2 * p.decay);
  const out = new Float64Array(F);
  for (let j = 0; j < F; j++) out[j] = Math.sqrt(((1 - p.noise) * w[j]) / sum + p.noise / F);
  return out;
}

/**
 * Expected fraction of ‖X_l‖²_F captured by the top-r singular directions when T ≫ F: Σ_{j<r} σ_j²
 * (channel gains 1). The sample Gram XᵀX/T concentrates on V·diag(σ²)·Vᵀ with relative error
 * O(√(F/T)).
 */
export function plantedEnergyFraction(p: Pick<SyntheticKindParams, 'decay' | 'noise'>, F: number, r: number): number {
  const s = plantedSpectrum(p, F);
  let e = 0;
  for (let j = 0; j < Math.min(r, F); j++) e += s[j] * s[j];
  return e;
}

/** Coupling a_j of component j (see {@link SyntheticKindParams}). */
export function plantedCoupling(p: Pick<SyntheticKindParams, 'coupling' | 'couplingDecay'>, j: number): number {
  return Math.min(1, p.coupling * Math.pow(j + 1, -p.couplingDecay));
}

/**
 * Expected adjacent-layer alignment of the top-k left singular subspaces (mean squared cosine of the
 * principal angles): for k ≪ T and well-separated singular values, the top-k subspace of X_l is
 * spanned by Z_l's first k columns, and column j of Z_{l+1} keeps the fraction a_j² of its energy in
 * it plus (1 − a_j²)·k/T by chance; so (1/k)·Σ_{j<k} [a_j² + (1 − a_j²)·k/T].
 */
export function plantedAlignment(p: Pick<SyntheticKindParams, 'coupling' | 'couplingDecay'>, k: number, T: number): number {
  let s = 0;
  for (let j = 0; j < k; j++) {
    const a2 = plantedCoupling(p, j) ** 2;
    s += a2 + ((1 - a2) * k) / T;
  }
  return s / k;
}

/**
 * Expected ratio of an outlier channel's RMS to a normal channel's, with Hadamard mixing (F a power
 * of 2) and channelSpread 0: a normal channel has expected power s²·Σ_j σ_j²·V[c,j]² = s²/F, an
 * outlier channel s²·(1/F + γ²) = outlierGain²·s²/F; so the ratio is `outlierGain` (1 without
 * outlier pairs).
 */
export function plantedOutlierRatio(p: Pick<SyntheticKindParams, 'outlierPairs' | 'outlierGain'>): number {
  return p.outlierPairs > 0 ? p.outlierGain : 1;
}

// ---- counter-based random numbers: the value at (stream, row, col) never depends on chunking ----

/** lowbias32 integer hash (Chris Wellons' hash-prospector). */
function hash32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d);
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b);
  return (x ^ (x >>> 16)) >>> 0;
}

function streamKey(seed: number, ...parts: number[]): number {
  let h = hash32((seed | 0) ^ 0x5bd1e995);
  for (const p of parts) h = hash32((h ^ (p | 0)) + 0x9e3779b9);
  return h;
}

const SQRT12 = Math.sqrt(12);

/** Fills out[j] with zero-mean unit-variance draws (uniform on [−√3, √3]) for (key, row, j). */
function fillRow(out: Float32Array | Float64Array, key: number, row: number, n: number, offset = 0): void {
  const rk = hash32(key ^ Math.imul(row + 1, 0x27d4eb2f));
  for (let j = 0; j < n; j++) out[offset + j] = (hash32(rk + Math.imul(j, 0x9e3779b9)) / 4294967296 - 0.5) * SQRT12;
}

/** Standard normal draws from the counter-based stream (Box–Muller), for per-channel gains. */
function normals(key: number, n: number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i += 2) {
    const u1 = (hash32(key + Math.imul(i, 0x9e3779b9)) + 1) / 4294967297;
    const u2 = hash32(key ^ Math.imul(i + 1, 0x85ebca6b)) / 4294967296;
    const [a, b] = normalPair(u1, u2);
    out[i] = a;
    if (i + 1 < n) out[i + 1] = b;
  }
  return out;
}

/** Random permutation of 0..n−1 (Fisher–Yates on the counter-based stream). */
function permutation(key: number, n: number): Int32Array {
  const p = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = hash32(key + Math.imul(i, 0x2545f491)) % (i + 1);
    const t = p[i];
    p[i] = p[j];
    p[j] = t;
  }
  return p;
}

/** Orthonormal F×F mixing basis, row-major: Hadamard/√F when F is a power of 2, else DCT-II. */
export function mixingBasis(F: number): Float64Array {
  const H = new Float64Array(F * F);
  if ((F & (F - 1)) === 0) {
    const s = 1 / Math.sqrt(F);
    for (let i = 0; i < F; i++) {
      for (let j = 0; j < F; j++) {
        // Sylvester: H[i][j] = (−1)^popcount(i & j)
        let b = i & j;
        b -= (b >>> 1) & 0x55555555;
        b = (b & 0x33333333) + ((b >>> 2) & 0x33333333);
        const pc = (((b + (b >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
        H[i * F + j] = pc & 1 ? -s : s;
      }
    }
    return H;
  }
  for (let i = 0; i < F; i++) {
    for (let j = 0; j < F; j++) {
      const c = j === 0 ? Math.sqrt(1 / F) : Math.sqrt(2 / F);
      H[i * F + j] = c * Math.cos((Math.PI * (i + 0.5) * j) / F);
    }
  }
  return H;
}

/** Per-channel log-normal gains g_l (length F = H_kv·d) of one layer. */
export function channelGains(p: SyntheticKindParams, F: number, key: number): Float64Array {
  const g = new Float64Array(F).fill(1);
  if (p.channelSpread > 0) {
    const z = normals(streamKey(key, 1), F);
    for (let c = 0; c < F; c++) g[c] = Math.exp(p.channelSpread * z[c]);
  }
  return g;
}

/**
 * Outlier channels of one layer and the leading token factor each one carries: per KV head,
 * `outlierPairs` RoPE rotation pairs drawn at random; pair i of head h loads factors
 * j = (h·pairs + i) mod 8 (first channel) and j + 1 mod 8 (second).
 */
export function outlierChannels(p: SyntheticKindParams, layout: ModelLayout, rope: RopeConfig, key: number): { channel: number; factor: number }[] {
  const { nKvHeads: H, headDim: d } = layout;
  const F = H * d;
  const m = Math.min(8, F);
  const pairs = Math.min(p.outlierPairs, d / 2);
  const out: { channel: number; factor: number }[] = [];
  for (let h = 0; h < H && pairs > 0; h++) {
    const perm = permutation(streamKey(key, 2, h), d / 2);
    for (let i = 0; i < pairs; i++) {
      const q = perm[i];
      const [a, b] = rope.layout === 'half' ? [q, q + d / 2] : [2 * q, 2 * q + 1];
      const j = (h * pairs + i) % m;
      out.push({ channel: h * d + a, factor: j }, { channel: h * d + b, factor: (j + 1) % m });
    }
  }
  return out;
}

function checkParams(p: SyntheticKindParams, what: string): void {
  check(p.decay >= 0 && Number.isFinite(p.decay), 'config', `synthetic ${what}.decay must be ≥ 0, got ${p.decay}`);
  check(p.noise >= 0 && p.noise < 1, 'config', `synthetic ${what}.noise must be in [0, 1), got ${p.noise}`);
  check(p.coupling >= 0 && p.coupling <= 1, 'config', `synthetic ${what}.coupling must be in [0, 1], got ${p.coupling}`);
  check(p.couplingDecay >= 0, 'config', `synthetic ${what}.couplingDecay must be ≥ 0, got ${p.couplingDecay}`);
  check(Number.isInteger(p.outlierPairs) && p.outlierPairs >= 0, 'config', `synthetic ${what}.outlierPairs must be an integer ≥ 0, got ${p.outlierPairs}`);
  check(p.outlierGain >= 1 && p.channelSpread >= 0 && p.rms > 0, 'config', `synthetic ${what}: outlierGain must be ≥ 1, rms > 0 and channelSpread ≥ 0`);
}

/**
 * A synthetic prefill KV cache shaped like Llama-3.1-8B's (by default: 32 layers, 8 KV heads × 128,
 * pre-RoPE keys and values [T, H_kv, d] float32 per layer), with the structure of real caches
 * planted as described in {@link SyntheticKindParams}: power-law singular-value decay, a token
 * subspace shared between adjacent layers while per-token adjacent-layer cosines are ≈ 0, and a few
 * outlier key channels. `kvpack bench structure` measures the same properties on real models.
 *
 * Generated on the tfjs backend in chunks of `chunkTokens` tokens (host draws, one [n, F]·[F, F]
 * product per layer and kind), so transient memory stays at one chunk plus one layer on top of the
 * result: 2 · L · T · F · 4 bytes (32 layers × 32K tokens = 8 GiB; use `layers` on small machines).
 * With `observationWindow` w, also post-RoPE queries [w, H, d] per layer: each query head copies its
 * KV head's key at that token plus 20% noise, rotated at its position.
 * The caller owns (and must dispose) the returned tensors.
 * @throws KvpackError('config') for bad sizes or parameters.
 */
export async function syntheticLlamaCache(opts: SyntheticCacheOptions): Promise<SyntheticCache> {
  const base = opts.layout ?? LLAMA31_8B_LAYOUT;
  const layout: ModelLayout = { ...base, nLayers: opts.layers ?? base.nLayers };
  const rope = opts.rope ?? LLAMA31_8B_ROPE;
  const { T } = opts;
  const { nLayers: L, nKvHeads: Hkv, headDim: d, nHeads: Hq } = layout;
  const F = Hkv * d;
  const seed = opts.seed ?? 0;
  const chunk = opts.chunkTokens ?? 4096;
  const w = opts.observationWindow ?? 0;
  check(Number.isInteger(T) && T >= 1, 'config', `synthetic cache: T must be a positive integer, got ${T}`);
  check(Number.isInteger(L) && L >= 1, 'config', `synthetic cache: layers must be a positive integer, got ${L}`);
  check(d % 2 === 0 && Hq % Hkv === 0, 'config', `synthetic cache: head_dim ${d} must be even and ${Hq} query heads a multiple of ${Hkv} KV heads`);
  check(Number.isInteger(chunk) && chunk >= 1, 'config', `synthetic cache: chunkTokens must be a positive integer, got ${chunk}`);
  check(Number.isInteger(w) && w >= 0 && w <= T, 'config', `synthetic cache: observationWindow ${w} must be an integer in [0, T = ${T}]`);
  const params = { keys: { ...DEFAULT_SYNTHETIC_KEYS, ...opts.keys }, values: { ...DEFAULT_SYNTHETIC_VALUES, ...opts.values } };
  checkParams(params.keys, 'keys');
  checkParams(params.values, 'values');

  const basis = mixingBasis(F);
  const kinds = ['keys', 'values'] as const;
  // Per kind and layer: W_l = s · diag(σ) · V_lᵀ · diag(g_l), [F, F], uploaded once.
  const mix: Record<(typeof kinds)[number], tf.Tensor2D[]> = { keys: [], values: [] };
  const coupling: Record<(typeof kinds)[number], Float64Array> = { keys: new Float64Array(F), values: new Float64Array(F) };
  const parts: Record<(typeof kinds)[number], tf.Tensor2D[][]> = { keys: [], values: [] };
  try {
    for (const [ki, kind] of kinds.entries()) {
      const p = params[kind];
      const sigma = plantedSpectrum(p, F);
      for (let j = 0; j < F; j++) coupling[kind][j] = plantedCoupling(p, j);
      const scale = p.rms * Math.sqrt(F);
      for (let l = 0; l < L; l++) {
        const key = streamKey(seed, 100 + ki, l);
        const perm = permutation(streamKey(key, 3), F);
        const sign = normals(streamKey(key, 4), F);
        const g = channelGains(p, F, key);
        const W = new Float32Array(F * F);
        for (let c = 0; c < F; c++) {
          // V_l[c, j] = sign_c · B[perm_c, j]
          const row = perm[c] * F;
          const sc = (sign[c] < 0 ? -scale : scale) * g[c];
          for (let j = 0; j < F; j++) W[j * F + c] = sigma[j] * basis[row + j] * sc;
        }
        const gamma = Math.sqrt((p.outlierGain ** 2 - 1) / F);
        for (const o of outlierChannels(p, layout, rope, key)) {
          // Grow the channel's loading on its factor so that its square gains exactly γ²·s²·g²
          // (no cross term: the channel's power rises by γ², whatever its other loadings).
          const i = o.factor * F + o.channel;
          W[i] = (W[i] < 0 ? -1 : 1) * Math.sqrt(W[i] * W[i] + (gamma * scale * g[o.channel]) ** 2);
        }
        mix[kind].push(tf.tensor2d(W, [F, F]));
      }
      parts[kind] = Array.from({ length: L }, () => []);
    }
    const nChunks = Math.ceil(T / chunk);
    let done = 0;
    for (let c0 = 0; c0 < T; c0 += chunk) {
      const n = Math.min(chunk, T - c0);
      for (const [ki, kind] of kinds.entries()) {
        const a = coupling[kind];
        const b = Float64Array.from(a, (x) => Math.sqrt(Math.max(0, 1 - x * x)));
        const Z = new Float32Array(n * F);
        const e = new Float32Array(F);
        for (let l = 0; l < L; l++) {
          const key = streamKey(seed, 200 + ki, l);
          for (let t = 0; t < n; t++) {
            const o = t * F;
            if (l === 0) fillRow(Z, key, c0 + t, F, o);
            else {
              fillRow(e, key, c0 + t, F);
              for (let j = 0; j < F; j++) Z[o + j] = a[j] * Z[o + j] + b[j] * e[j];
            }
          }
          const zt = tf.tensor2d(Z, [n, F]);
          parts[kind][l].push(tf.matMul(zt, mix[kind][l]));
          zt.dispose();
          opts.onProgress?.(++done, nChunks * L * 2);
        }
      }
    }
  } catch (e) {
    tf.dispose([...mix.keys, ...mix.values, ...parts.keys.flat(), ...parts.values.flat()]);
    throw e;
  }
  tf.dispose([...mix.keys, ...mix.values]);
  const join = (ps: tf.Tensor2D[]): tf.Tensor3D => {
    const x = ps.length === 1 ? ps[0] : tf.concat(ps, 0);
    if (ps.length > 1) tf.dispose(ps);
    const r = tf.reshape(x, [T, Hkv, d]) as tf.Tensor3D;
    x.dispose();
    return r;
  };
  const keys = parts.keys.map(join);
  const values = parts.values.map(join);
  const cache: SyntheticCache = { layout, rope, keys, values, startPosition: 0, planted: { ...params, seed } };
  if (w > 0) {
    const g = Hq / Hkv;
    cache.queries = keys.map((k, l) =>
      tf.tidy(() => {
        const kw = tf.slice(k, [T - w, 0, 0], [w, Hkv, d]);
        const q = tf.reshape(tf.tile(tf.reshape(kw, [w, Hkv, 1, d]), [1, 1, g, 1]), [w, Hq, d]) as tf.Tensor3D;
        const noise = new Float32Array(w * Hq * d);
        const key = streamKey(seed, 300, l);
        for (let t = 0; t < w; t++) fillRow(noise, key, t, Hq * d, t * Hq * d);
        const rms = params.keys.rms * 0.2;
        const qn = tf.add(q, tf.mul(tf.tensor3d(noise, [w, Hq, d]), rms)) as tf.Tensor3D;
        return applyRope(qn, rope, { start: T - w, count: w });
      }),
    );
  }
  return cache;
}
