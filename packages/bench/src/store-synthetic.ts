import * as tf from '@tensorflow/tfjs-core';
import { z } from 'zod';
import { KvpackError, cutCachePrefix, deserializeCache, isHostBackend, type CompressedCache, type ModelLayout, type Strategy, compressionRatioOf } from '@kvpack/core';
import { PrefixStore, openBackend, type StoreBackend } from '@kvpack/store';
import { LLAMA31_8B_LAYOUT, syntheticLlamaCache } from './perf/synthetic.js';
import { median, syncTensors, timeOp } from './perf/stats.js';

/**
 * `synthetic` section of the `kvpack bench store` config: Llama-3.1-8B-shaped synthetic caches
 * (32 query heads, 8 KV heads, head_dim 128; `layers` of its 32 layers) at each prefix length.
 */
export const SyntheticStoreSchema = z.strictObject({
  /** The stored strategy for these caches (default: the config's `strategy`), e.g. xKV-4 at the paper's Llama-3.1-8B ranks. */
  strategy: z.strictObject({ name: z.string().min(1), options: z.record(z.string(), z.unknown()).optional() }).optional(),
  /** Prefix lengths T in tokens (each a multiple of the chunk size); 4K … 32K for the figures, tiny in tests. */
  tokens: z.array(z.int().positive()).min(1).default([4096, 8192]),
  /** Layers generated, compressed and stored (of Llama-3.1-8B's 32): 4 fit a CPU at 32K tokens. */
  layers: z.int().positive().max(32).default(4),
  /** Seed of the synthetic cache and token ids. */
  seed: z.int().default(0),
  /** Hidden size of the prefill arithmetic (Llama-3.1-8B: 4,096). */
  hiddenSize: z.int().positive().default(4096),
  /** MLP intermediate size of the prefill arithmetic (Llama-3.1-8B: 14,336). */
  intermediateSize: z.int().positive().default(14336),
  /** Rows of one timed tile of the prefill arithmetic (query and key block of the attention). */
  tile: z.int().positive().default(256),
});
export type SyntheticStoreConfig = z.output<typeof SyntheticStoreSchema>;

/**
 * The prefill arithmetic of T tokens over `layers` Llama layers, as tiles of B = min(tile, T) rows:
 * per layer, for each of the n = T / B row tiles, the projections x·W_qkv [B, h]·[h, (H + 2·H_kv)·d],
 * attn·W_o [B, H·d]·[H·d, h], x·W_gate and x·W_up [B, h]·[h, i] each, and act·W_down [B, i]·[i, h];
 * for each of the n(n+1)/2 causal (query tile, key tile) pairs, the scores Q·Kᵀ and the mix P·V of
 * all H query heads, in the form core's `attention` computes them (per KV head, its g = H / H_kv
 * query heads stacked: [B·g, d]·[d, B] and [B·g, B]·[B, d]; one 2-D matMul per KV head on wasm/cpu,
 * one batched matMul elsewhere); a diagonal tile is counted whole, as a tiled kernel computes it.
 * Not counted: embedding, RMSNorm, RoPE, softmax, SiLU, residual adds and the LM head, so the time
 * is a lower bound of a real prefill on the same backend.
 */
export interface PrefillArithmetic {
  tile: number;
  /** Row tiles n (fractional when B does not divide T) and causal attention tile pairs. */
  rowTiles: number;
  attentionTilePairs: number;
  /** Floating-point operations (multiply-adds counted as 2), projections and attention, all layers. */
  projectionFlops: number;
  attentionFlops: number;
  /** Median tile times × counts, ms, all layers. */
  projectionMs: number;
  attentionMs: number;
  totalMs: number;
}

/** Median ms of one tile of each product, per tile size (timed once per run). */
interface TileTimes {
  qkv: number;
  o: number;
  gate: number;
  down: number;
  scores: number;
  mix: number;
}

/** Times one tile of every product of {@link PrefillArithmetic} (inputs and weights filled with a constant: timing does not depend on the values). */
async function timeTiles(B: number, layout: ModelLayout, hidden: number, inter: number, reps: number): Promise<TileTimes> {
  const { nHeads: H, nKvHeads: Hkv, headDim: d } = layout;
  const opts = { reps, warmup: 1 };
  const mm = async (m: number, k: number, n: number) => {
    const a = tf.fill([m, k], 1 / k) as tf.Tensor2D;
    const w = tf.fill([k, n], 1 / k) as tf.Tensor2D;
    try {
      return (await timeOp(() => tf.matMul(a, w), opts)).medianMs;
    } finally {
      tf.dispose([a, w]);
    }
  };
  // The attention products in the form core's attention() computes them (GQA: the g = H / H_kv query
  // heads of a KV head stacked as rows): on wasm/cpu one 2-D matMul per KV head, [B·g, d]·[d, B] and
  // [B·g, B]·[B, d] (batched matMuls are several times slower there); elsewhere one batched matMul.
  const g = H / Hkv;
  const heads = async (x: [number, number], y: [number, number]) => {
    const host = isHostBackend();
    const a = host ? Array.from({ length: Hkv }, () => tf.fill(x, 1 / x[1]) as tf.Tensor2D) : [tf.fill([Hkv, ...x], 1 / x[1]) as tf.Tensor3D];
    const b = host ? Array.from({ length: Hkv }, () => tf.fill(y, 1 / y[0]) as tf.Tensor2D) : [tf.fill([Hkv, ...y], 1 / y[0]) as tf.Tensor3D];
    try {
      return (await timeOp(() => a.map((t, i) => tf.matMul(t, b[i])), opts)).medianMs;
    } finally {
      tf.dispose([...a, ...b]);
    }
  };
  return {
    qkv: await mm(B, hidden, (H + 2 * Hkv) * d),
    o: await mm(B, H * d, hidden),
    gate: await mm(B, hidden, inter),
    down: await mm(B, inter, hidden),
    scores: await heads([B * g, d], [d, B]),
    mix: await heads([B * g, B], [B, d]),
  };
}

/** Counts and flops of {@link PrefillArithmetic} for T tokens (no timing). */
export function prefillArithmeticCounts(T: number, layers: number, layout: ModelLayout, hidden: number, inter: number, tile: number) {
  const { nHeads: H, nKvHeads: Hkv, headDim: d } = layout;
  const B = Math.min(tile, T);
  const n = T / B;
  const whole = Math.ceil(n);
  const pairs = (whole * (whole + 1)) / 2;
  const perRow = 2 * (hidden * (H + 2 * Hkv) * d + H * d * hidden + 2 * hidden * inter + inter * hidden);
  return {
    B,
    rowTiles: n,
    attentionTilePairs: pairs,
    projectionFlops: layers * T * perRow,
    attentionFlops: layers * pairs * 2 * (2 * H * B * B * d),
  };
}

/** One synthetic prefix length's figures. */
export interface SyntheticStoreRow {
  tokens: number;
  layers: number;
  /** Record bytes per token (envelope, container header and payload): stored strategy, raw KV. */
  storedBytesPerToken: number;
  rawBytesPerToken: number;
  /** 2 (K, V) × layers × H_kv × head_dim × 2 bytes. */
  denseFp16BytesPerToken: number;
  ratioVsFp16: number;
  /** The same in kvpress's form, compression_ratio: the fraction removed, 1 − 1/ratioVsFp16. */
  compressionRatioVsFp16: number;
  ratioVsRaw: number;
  /** Medians, ms: fetch (lookup: manifests, record, CRC), restore (deserializeCache), reconstruct (post-RoPE keys and values of every layer). */
  fetchMs: number;
  restoreMs: number;
  reconstructMs: number;
  storedPathMs: number;
  rawPathMs: number;
  /** The prefix of ⌊T/2⌋ (chunk-aligned) restored by cutting the stored T-token record: fetch + restore + cut + reconstruct, ms (null when the strategy cannot be cut). */
  cutPathMs: number | null;
  cutTokens: number;
  prefill: PrefillArithmetic;
  /** prefill arithmetic ÷ stored path, and ÷ raw path (> 1: restoring beats recomputing). */
  speedup: number;
  rawSpeedup: number;
}

async function reconstruct(cache: CompressedCache): Promise<void> {
  const out: tf.Tensor[] = [];
  for (let l = 0; l < cache.layout.nLayers; l++) out.push(cache.keys(l), cache.values(l));
  try {
    await syncTensors(out);
  } finally {
    tf.dispose(out);
  }
}

/** Fetch, restore (and cut, when `cut`), reconstruct: ms of each step. */
async function timePath(store: PrefixStore, ids: number[], T: number, fingerprint: string, cut = false) {
  const t0 = performance.now();
  const hit = await store.lookup(ids, { maxTokens: T, cut });
  const t1 = performance.now();
  if (!hit || hit.tokens !== T || (cut && !hit.source)) throw new KvpackError('io', `bench store: the ${T}-token synthetic prefix was not found${cut ? ' as a cut' : ''} in ${store.backend.location}`);
  let cache = deserializeCache(hit.cache, { model: fingerprint });
  if (hit.source) {
    const whole = cache;
    cache = await cutCachePrefix(whole, T).finally(() => whole.dispose());
  }
  const t2 = performance.now();
  try {
    await reconstruct(cache);
  } finally {
    cache.dispose();
  }
  const t3 = performance.now();
  return { fetch: t1 - t0, restore: t2 - t1, reconstruct: t3 - t2, total: t3 - t0 };
}

/**
 * The store figures on Llama-3.1-8B-shaped synthetic caches (`syntheticLlamaCache`, `layers` layers),
 * per prefix length T, side by side in one run: record bytes per token against dense fp16 and the raw
 * KV; fetch + restore + reconstruct against the prefill arithmetic of T tokens on the same backend
 * ({@link PrefillArithmetic}); and a half-length prefix cut from the stored record.
 */
export async function syntheticStoreRows(
  cfg: SyntheticStoreConfig,
  o: { strategy: Strategy; raw: Strategy; url: string; chunkTokens: number; repeats: number; log: (s: string) => void },
): Promise<SyntheticStoreRow[]> {
  const layout = LLAMA31_8B_LAYOUT;
  const fp16 = 2 * cfg.layers * layout.nKvHeads * layout.headDim * 2;
  const tiles = new Map<number, TileTimes>();
  const rows: SyntheticStoreRow[] = [];
  const fingerprint = `synthetic:llama-3.1-8b-shaped:layers=${cfg.layers}:seed=${cfg.seed}`;
  const backends: StoreBackend[] = [];
  const mk = (s: Strategy) => {
    const b = openBackend(o.url);
    backends.push(b);
    return new PrefixStore({ backend: b, model: fingerprint, strategy: s, chunkTokens: o.chunkTokens, onWarning: (w) => o.log(`store: ${w.message}`) });
  };
  try {
    const sStore = mk(o.strategy);
    const rStore = mk(o.raw);
    for (const T of cfg.tokens) {
      if (T % o.chunkTokens !== 0) throw new KvpackError('config', `bench store: synthetic prefix length ${T} is not a multiple of chunkTokens ${o.chunkTokens}`);
      o.log(`synthetic Llama-3.1-8B-shaped cache: ${T} tokens, ${cfg.layers} layers`);
      // Ids differ per T, so that a shorter T's record is not a record of this T's prefixes.
      const ids = Array.from({ length: T }, (_, i) => (cfg.seed * 7919 + T * 31 + i * 104729) % 128000);
      const kv = await syntheticLlamaCache({ T, layers: cfg.layers, seed: cfg.seed });
      kv.model = fingerprint;
      let put, rput;
      try {
        const sc = await o.strategy.compress(kv);
        put = await sStore.put(ids, sc).finally(() => sc.dispose());
        const rc = await o.raw.compress(kv);
        rput = await rStore.put(ids, rc).finally(() => rc.dispose());
      } finally {
        tf.dispose([...kv.keys, ...kv.values]);
      }
      const counts = prefillArithmeticCounts(T, cfg.layers, layout, cfg.hiddenSize, cfg.intermediateSize, cfg.tile);
      if (!tiles.has(counts.B)) tiles.set(counts.B, await timeTiles(counts.B, layout, cfg.hiddenSize, cfg.intermediateSize, o.repeats));
      const t = tiles.get(counts.B)!;
      const projectionMs = cfg.layers * counts.rowTiles * (t.qkv + t.o + 2 * t.gate + t.down);
      const attentionMs = cfg.layers * counts.attentionTilePairs * (t.scores + t.mix);
      const cutTokens = Math.max(o.chunkTokens, Math.floor(T / 2 / o.chunkTokens) * o.chunkTokens);
      const canCut = sStore.cuttable() && cutTokens < T;
      await timePath(sStore, ids, T, fingerprint); // warm-up
      const fetch: number[] = [], restore: number[] = [], rec: number[] = [], total: number[] = [], raw: number[] = [], cut: number[] = [];
      for (let i = 0; i < o.repeats; i++) {
        const s = await timePath(sStore, ids, T, fingerprint);
        fetch.push(s.fetch);
        restore.push(s.restore);
        rec.push(s.reconstruct);
        total.push(s.total);
        raw.push((await timePath(rStore, ids, T, fingerprint)).total);
        // ids past cutTokens are changed, so that no record of that length can be found: the cut is the only hit.
        if (canCut) cut.push((await timePath(sStore, ids, cutTokens, fingerprint, true)).total);
      }
      const prefill: PrefillArithmetic = {
        tile: counts.B,
        rowTiles: counts.rowTiles,
        attentionTilePairs: counts.attentionTilePairs,
        projectionFlops: counts.projectionFlops,
        attentionFlops: counts.attentionFlops,
        projectionMs,
        attentionMs,
        totalMs: projectionMs + attentionMs,
      };
      const storedPathMs = median(total);
      const rawPathMs = median(raw);
      rows.push({
        tokens: T,
        layers: cfg.layers,
        storedBytesPerToken: put.recordBytes / T,
        rawBytesPerToken: rput.recordBytes / T,
        denseFp16BytesPerToken: fp16,
        ratioVsFp16: (fp16 * T) / put.recordBytes,
          compressionRatioVsFp16: compressionRatioOf((fp16 * T) / put.recordBytes),
        ratioVsRaw: rput.recordBytes / put.recordBytes,
        fetchMs: median(fetch),
        restoreMs: median(restore),
        reconstructMs: median(rec),
        storedPathMs,
        rawPathMs,
        cutPathMs: canCut ? median(cut) : null,
        cutTokens,
        prefill,
        speedup: prefill.totalMs / storedPathMs,
        rawSpeedup: prefill.totalMs / rawPathMs,
      });
    }
  } finally {
    await Promise.all(backends.map((b) => b.close()));
  }
  return rows;
}

/** Markdown of the synthetic rows. */
export function syntheticStoreTable(rows: SyntheticStoreRow[], backend: string): string[] {
  if (rows.length === 0) return [];
  const f = (x: number, d = 1) => x.toFixed(d);
  const r0 = rows[0];
  return [
    '',
    `### Llama-3.1-8B-shaped synthetic caches (${r0.layers} of 32 layers, 8 KV heads × head_dim 128), ${backend}`,
    '',
    '| T | stored B/token | dense fp16 B/token | raw B/token | fp16 ÷ stored | raw ÷ stored | fetch ms | restore ms | reconstruct ms | stored path ms | raw path ms | prefill arithmetic ms (attention + projections) | prefill ÷ stored path | prefill ÷ raw path | cut T/2 path ms |',
    '|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
    ...rows.map(
      (r) =>
        `| ${r.tokens} | ${f(r.storedBytesPerToken)} | ${r.denseFp16BytesPerToken} | ${f(r.rawBytesPerToken)} | ${f(r.ratioVsFp16, 2)}× (cr ${f(r.compressionRatioVsFp16, 3)}) | ${f(r.ratioVsRaw, 2)}× | ${f(r.fetchMs, 2)} | ${f(r.restoreMs, 2)} | ${f(r.reconstructMs)} | ${f(r.storedPathMs)} | ${f(r.rawPathMs)} | ${f(r.prefill.totalMs)} (${f(r.prefill.attentionMs)} + ${f(r.prefill.projectionMs)}) | ${f(r.speedup, 2)}× | ${f(r.rawSpeedup, 2)}× | ${r.cutPathMs === null ? '–' : `${f(r.cutPathMs)} (${r.cutTokens} of ${r.tokens})`} |`,
    ),
    '',
    `stored path = fetch (lookup: manifests, record, CRC checks) + restore (deserializeCache) + reconstruct (post-RoPE keys and values of every layer, synchronized). ` +
      `Prefill arithmetic = the matmuls of a ${r0.layers}-layer Llama-3.1-8B prefill of T tokens (hidden 4,096, MLP 14,336 unless configured), timed as tiles of ${r0.prefill.tile} rows on this backend: per row tile the QKV, output, gate, up and down projections; per causal (query, key) tile pair Q·Kᵀ and P·V over 32 query heads (grouped per KV head as core's attention does) — median tile time × tile count. ` +
      'Norms, RoPE, softmax, SiLU, embedding and LM head are not counted: a lower bound of the real prefill. cut T/2 path = the chunk-aligned half-length prefix served from the T-token record (fetch + restore + cut + reconstruct).',
  ];
}
