import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, applyRope, check, createStrategy, disposeKVCache, isWebGpuBackend, runFlatWgsl, sharedRopeTableBytes, wgslFlatIndex, type CompressedCache, type ModelLayout } from '@kvpack/core';
import { decodeModes, type DecodeMode } from './decode-modes.js';
import { halfMatMul } from './half-matmul.js';
import { timeInterleaved, fmtBytes, fmtMs } from './stats.js';
import { LLAMA31_8B_ROPE, syntheticLlamaCache } from './synthetic.js';

/** A decoder-only transformer's shape (Llama family: GQA attention, SwiGLU feed-forward). */
export interface ModelShape extends ModelLayout {
  /** Hidden size D. */
  hidden: number;
  /** Feed-forward inner size. */
  ffn: number;
  vocab: number;
}

/** Llama-3.1-8B: 32 layers, D = 4096, 32 query heads and 8 KV heads of 128, FFN 14,336, vocabulary 128,256. */
export const LLAMA31_8B_MODEL: Readonly<ModelShape> = Object.freeze({ nLayers: 32, nHeads: 32, nKvHeads: 8, headDim: 128, hidden: 4096, ffn: 14336, vocab: 128256 });

/** One cache setting of the whole-model decode benchmark. */
export interface ModelDecodeSetting {
  label: string;
  name: string;
  options: Record<string, unknown>;
  /** Which decode mode of the compressed cache runs the attention ("attend", "attend-full", "sparse", …). */
  mode: string;
}

/** The settings: dense fp16, xKV-4 at the paper's ranks in its fused full mode, and the same compressed for sparse decoding. */
export const MODEL_DECODE_SETTINGS: readonly ModelDecodeSetting[] = [
  { label: 'dense fp16', name: 'dense', options: { storage: 'float16' }, mode: 'attend' },
  { label: 'xkv G=4 r=512/768, full', name: 'xkv', options: { layersPerGroup: 4, rankK: 128, rankV: 192 }, mode: 'attend-full' },
  { label: 'xkv G=4 r=512/768, sparse 2048', name: 'xkv', options: { layersPerGroup: 4, rankK: 128, rankV: 192, decode: 'sparse', sparse: { budget: 2048 } }, mode: 'sparse' },
];

/** One row of the whole-model decode table. */
export interface ModelDecodeRow {
  setting: string;
  batch: number;
  /** Median ms of one decode step of the whole stack for the batch (one token per sequence, logits included). */
  stepMs: number;
  /** Tokens per second over the batch: batch / step. */
  tokensPerSecond: number;
  /** Step time over the dense fp16 step at the same batch. */
  vsDense: number | null;
  /** Tensor bytes the batch's caches keep on the backend (measured after the decode steps, what they derived for decoding included), and per sequence. */
  cacheBytes: number;
  cacheBytesPerSequence: number;
  /** Per sequence right after compression. */
  residentAfterCompress: number;
  /** Sequences of T tokens whose caches fit in `budgetBytes`: ⌊budget / per-sequence resident bytes⌋, and with the weights taken out first. */
  sequencesInBudget: number;
  sequencesBesideWeights: number;
}

/** Result of {@link runModelDecodeBench}. */
export interface ModelDecodeResult {
  shape: ModelShape;
  tokens: number;
  backend: string;
  /** Resident bytes of the float16 weights (packed). */
  weightBytes: number;
  budgetBytes: number;
  reps: number;
  rows: ModelDecodeRow[];
}

interface LayerWeights {
  attnNorm: tf.Tensor1D;
  ffnNorm: tf.Tensor1D;
  /** [D, (H + 2·H_kv)·d] float16: q | k | v projections. */
  qkv: HalfTensor;
  /** [H·d, D]. */
  o: HalfTensor;
  /** [D, 2·FFN]: gate | up. */
  gateUp: HalfTensor;
  /** [FFN, D]. */
  down: HalfTensor;
}

interface Weights {
  layers: LayerWeights[];
  norm: tf.Tensor1D;
  /** [D, vocab]. */
  lmHead: HalfTensor;
  bytes: number;
}

/**
 * Random float16 weights [K, N], uniform in ±1/√K (unit-variance outputs), made packed on the backend:
 * on webgpu one WGSL kernel hashes each word's index into two uniforms and packs them
 * (`pack2x16float`), so 15 GiB of weights take seconds; elsewhere drawn on the host and packed.
 */
async function randomHalf(K: number, N: number, seed: number): Promise<HalfTensor> {
  const a = 1 / Math.sqrt(K);
  const words = (K * N) / 2;
  if (!isWebGpuBackend()) {
    const x = tf.randomUniform([K, N], -a, a, 'float32', seed);
    try {
      return await HalfTensor.fromTensor(x);
    } finally {
      x.dispose();
    }
  }
  const packed = runFlatWgsl({
    key: `random_half_words_${seed >>> 0}_${a.toPrecision(9)}`,
    names: [],
    inputs: [],
    outputShape: [words],
    dtype: 'int32',
    invocations: words,
    code: `fn mix(x: u32) -> u32 {
  var h = x;
  h = (h ^ (h >> 16u)) * 0x7feb352du;
  h = (h ^ (h >> 15u)) * 0x846ca68bu;
  return h ^ (h >> 16u);
}
fn kernel(index: i32) {
  ${wgslFlatIndex('flat')}
  if (flat >= uniforms.outShape) { return; }
  let h0 = mix(u32(flat) * 2u + ${seed >>> 0}u * 0x9e3779b9u);
  let h1 = mix(h0 ^ 0x85ebca6bu);
  let u = vec2<f32>(f32(h0 >> 8u), f32(h1 >> 8u)) / 16777216.0 * 2.0 - 1.0;
  result[flat] = bitcast<i32>(pack2x16float(u * ${a.toPrecision(9)}));
}`,
  }) as tf.Tensor1D;
  return HalfTensor.fromPacked(packed, [K, N]);
}

async function randomWeights(s: ModelShape, seed: number): Promise<Weights> {
  const { hidden: D, nHeads: H, nKvHeads: Hkv, headDim: d, ffn: F } = s;
  const layers: LayerWeights[] = [];
  const ones = (n: number) => tf.tidy(() => tf.add(tf.ones([n]), tf.randomUniform([n], -0.1, 0.1, 'float32', seed + n)) as tf.Tensor1D);
  for (let l = 0; l < s.nLayers; l++) {
    const b = seed + 10 * l;
    layers.push({
      attnNorm: ones(D),
      ffnNorm: ones(D),
      qkv: await randomHalf(D, (H + 2 * Hkv) * d, b + 1),
      o: await randomHalf(H * d, D, b + 2),
      gateUp: await randomHalf(D, 2 * F, b + 3),
      down: await randomHalf(F, D, b + 4),
    });
  }
  const lmHead = await randomHalf(D, s.vocab, seed + 5);
  const norm = ones(D);
  const halves = [lmHead, ...layers.flatMap((w) => [w.qkv, w.o, w.gateUp, w.down])];
  const bytes = halves.reduce((a, h) => a + h.residentBytes, 0) + (2 * s.nLayers + 1) * D * 4;
  return { layers, norm, lmHead, bytes };
}

function disposeWeights(w: Weights): void {
  for (const l of w.layers) {
    tf.dispose([l.attnNorm, l.ffnNorm]);
    [l.qkv, l.o, l.gateUp, l.down].forEach((h) => h.dispose());
  }
  w.norm.dispose();
  w.lmHead.dispose();
}

const rmsNorm = (x: tf.Tensor2D, w: tf.Tensor1D) => tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), 1, true), 1e-5))), w) as tf.Tensor2D;

/**
 * One decode step of the whole stack for B sequences: per layer RMSNorm, the q|k|v product, RoPE of the
 * queries at position T, each sequence's attention over its own cache (the setting's decode mode), the
 * output product and residual, RMSNorm, SwiGLU (gate|up product, down product) and residual; then the
 * final norm and the vocabulary product. Returns the logits [B, vocab]. The step's new keys and values
 * are not appended: every step attends over the same T cached tokens, so repeated steps time the same
 * work.
 */
function decodeStep(s: ModelShape, w: Weights, x0: tf.Tensor2D, modes: DecodeMode[], position: number): tf.Tensor2D {
  const { nHeads: H, headDim: d, ffn: F } = s;
  const B = x0.shape[0];
  return tf.tidy(() => {
    let x = x0;
    for (let l = 0; l < s.nLayers; l++) {
      const lw = w.layers[l];
      const qkv = halfMatMul(rmsNorm(x, lw.attnNorm), lw.qkv);
      // Every sequence's query sits at position T: rotate the B·H heads as one token.
      const q = tf.reshape(applyRope(tf.reshape(tf.slice(qkv, [0, 0], [B, H * d]), [1, B * H, d]) as tf.Tensor3D, LLAMA31_8B_ROPE, { start: position, count: 1 }), [B, H, d]);
      const outs = modes.map((m, b) => tf.reshape(m.step(l, tf.slice(q, [b, 0, 0], [1, H, d]) as tf.Tensor3D), [1, H * d]));
      const attn = outs.length === 1 ? (outs[0] as tf.Tensor2D) : (tf.concat(outs, 0) as tf.Tensor2D);
      x = tf.add(x, halfMatMul(attn, lw.o));
      const gu = halfMatMul(rmsNorm(x, lw.ffnNorm), lw.gateUp);
      const g = tf.slice(gu, [0, 0], [B, F]);
      const u = tf.slice(gu, [0, F], [B, F]);
      x = tf.add(x, halfMatMul(tf.mul(tf.mul(g, tf.sigmoid(g)), u) as tf.Tensor2D, lw.down));
    }
    return halfMatMul(rmsNorm(x, w.norm), w.lmHead);
  });
}

/** Options of {@link runModelDecodeBench}. */
export interface ModelDecodeOptions {
  shape?: ModelShape;
  /** Cached tokens per sequence (default 32,768). */
  tokens?: number;
  /** Batch sizes (default 1 and 8). */
  batches?: number[];
  settings?: readonly ModelDecodeSetting[];
  /** Device memory the "sequences that fit" column counts against (default 100 GiB). */
  budgetBytes?: number;
  reps?: number;
  warmup?: number;
  seed?: number;
  log?: (line: string) => void;
}

/**
 * Whole-model decode benchmark: a stack of the given shape (default Llama-3.1-8B) with random float16
 * weights held packed, B sequences of T cached tokens each (a synthetic Llama-shaped group of 4 layers
 * repeated through the stack, compressed once per sequence: each sequence holds its own compressed cache), timing one decode step of the whole stack (median of
 * `reps` after `warmup`, one readback of the next tokens per step) and measuring the tensor bytes the
 * caches keep. Settings run one after another; each one's caches are freed before the next.
 * @throws KvpackError('config') for bad options; whatever the strategies throw.
 */
export async function runModelDecodeBench(o: ModelDecodeOptions = {}): Promise<ModelDecodeResult> {
  const shape = o.shape ?? LLAMA31_8B_MODEL;
  const T = o.tokens ?? 32768;
  const batches = o.batches ?? [1, 8];
  const settings = o.settings ?? MODEL_DECODE_SETTINGS;
  const budgetBytes = o.budgetBytes ?? 100 * 2 ** 30;
  const reps = o.reps ?? 5;
  const warmup = o.warmup ?? 1;
  const seed = o.seed ?? 0;
  const log = o.log ?? (() => {});
  check(Number.isInteger(T) && T >= 1, 'config', `model decode: tokens must be a positive integer, got ${T}`);
  check(batches.length > 0 && batches.every((b) => Number.isInteger(b) && b >= 1 && b <= 16), 'config', `model decode: batch sizes must be integers in 1 … 16, got ${batches.join(',')}`);
  const t0 = performance.now();
  const weights = await randomWeights(shape, seed);
  log(`weights: ${fmtBytes(weights.bytes)} float16 (packed) in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const rows: ModelDecodeRow[] = [];
  const maxBatch = Math.max(...batches);
  try {
    for (const s of settings) {
      const strategy = createStrategy({ name: s.name, options: s.options });
      const caches: CompressedCache[] = [];
      try {
        const before = tf.memory().numBytes - sharedRopeTableBytes();
        // One synthetic group of 4 layers, repeated through the stack (its tensors shared), compressed once
        // per sequence: every sequence holds its own compressed cache (same content, its own memory).
        const G = Math.min(4, shape.nLayers);
        const base = await syntheticLlamaCache({ T, layers: G, layout: { ...shape, nLayers: G }, seed: seed + 100 });
        try {
          const cache = {
            ...base,
            layout: { ...base.layout, nLayers: shape.nLayers },
            keys: Array.from({ length: shape.nLayers }, (_, l) => base.keys[l % G]),
            values: Array.from({ length: shape.nLayers }, (_, l) => base.values[l % G]),
            ...(base.queries ? { queries: Array.from({ length: shape.nLayers }, (_, l) => base.queries![l % G]) } : {}),
          };
          for (let b = 0; b < maxBatch; b++) caches.push(await strategy.compress(cache));
        } finally {
          disposeKVCache(base);
        }
        // Shared RoPE tables (one per head_dim and range, kept for every cache of the process) are not a cache's bytes.
        const resident = () => (tf.memory().numBytes - sharedRopeTableBytes() - before) / maxBatch;
        const afterCompress = resident();
        log(`${s.label}: ${maxBatch} caches of ${T} tokens, ${fmtBytes(afterCompress)} resident each`);
        const timed: { B: number; ms: number }[] = [];
        for (const B of batches) {
          const sparseBudget = (s.options.sparse as { budget?: number } | undefined)?.budget ?? 2048;
          const modes = caches.slice(0, B).map((c) => {
            const all = decodeModes(c, { sparseBudget });
            const m = all.find((x) => x.mode === s.mode);
            check(m !== undefined, 'config', `model decode: ${s.label}: the cache offers no "${s.mode}" decode mode (it offers ${all.map((x) => x.mode).join(', ')})`);
            return m;
          });
          const x = tf.randomNormal([B, shape.hidden], 0, 1, 'float32', seed + B) as tf.Tensor2D;
          try {
            const t = await timeInterleaved(
              {
                step: async () => {
                  const logits = decodeStep(shape, weights, x, modes, T);
                  const next = tf.argMax(logits, 1);
                  logits.dispose();
                  await next.data();
                  next.dispose();
                  return null;
                },
              },
              { reps, warmup },
            );
            timed.push({ B, ms: t.step.medianMs });
            log(`${s.label}, batch ${B}: step ${fmtMs(t.step.medianMs)} (${((1000 * B) / t.step.medianMs).toFixed(1)} tokens/s)`);
          } finally {
            x.dispose();
            modes.forEach((m) => m.dispose?.());
          }
        }
        // What a cache derives for decoding (e.g. sparse mode's per-head tensors) stays with it: count it.
        const perSeq = Math.max(afterCompress, resident());
        for (const { B, ms } of timed) {
          const dense = rows.find((r) => r.batch === B && r.setting === settings[0].label);
          rows.push({
            setting: s.label,
            batch: B,
            stepMs: ms,
            tokensPerSecond: (1000 * B) / ms,
            vsDense: dense ? ms / dense.stepMs : null,
            cacheBytes: perSeq * B,
            cacheBytesPerSequence: perSeq,
            residentAfterCompress: afterCompress,
            sequencesInBudget: Math.floor(budgetBytes / perSeq),
            sequencesBesideWeights: Math.max(0, Math.floor((budgetBytes - weights.bytes) / perSeq)),
          });
        }
      } finally {
        caches.forEach((c) => c.dispose());
      }
    }
  } finally {
    disposeWeights(weights);
  }
  return { shape, tokens: T, backend: tf.getBackend(), weightBytes: weights.bytes, budgetBytes, reps, rows };
}

/** The whole-model decode table as Markdown. */
export function modelDecodeMarkdown(r: ModelDecodeResult, device: string): string {
  const s = r.shape;
  const out = [
    `Whole-model decode, ${device}, ${r.backend}: ${s.nLayers} layers, D = ${s.hidden}, ${s.nHeads} query / ${s.nKvHeads} KV heads × ${s.headDim}, FFN ${s.ffn}, vocabulary ${s.vocab}; ` +
      `random float16 weights held packed (${fmtBytes(r.weightBytes)}); T = ${r.tokens} cached tokens per sequence; median of ${r.reps} steps.`,
    '',
    `| cache | batch | step | tokens/s | × dense | resident per sequence | sequences in ${fmtBytes(r.budgetBytes)} | beside the weights |`,
    '| --- | --- | --- | --- | --- | --- | --- | --- |',
  ];
  for (const x of r.rows)
    out.push(
      `| ${x.setting} | ${x.batch} | ${fmtMs(x.stepMs)} | ${x.tokensPerSecond.toFixed(1)} | ${x.vsDense === null ? '–' : `${x.vsDense.toFixed(2)}×`} | ` +
        `${fmtBytes(x.cacheBytesPerSequence)}${x.residentAfterCompress !== x.cacheBytesPerSequence ? ` (${fmtBytes(x.residentAfterCompress)} before decoding)` : ''} | ` +
        `${x.sequencesInBudget} | ${x.sequencesBesideWeights} |`,
    );
  return out.join('\n');
}
