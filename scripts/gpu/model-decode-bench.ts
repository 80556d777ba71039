// Whole-model decode benchmark: one decode step of a Llama-3.1-8B-shaped stack (32 layers, hidden
// 4096, 32 query heads, 8 KV heads, head_dim 128, SwiGLU FFN 14336) with random weights held as
// packed float16 (HalfTensor, unpacked inside a WGSL matvec), over a T = 32K context, at batch 1 and
// 8, with three caches: dense (uncompressed keys/values), xKV full mode and xKV sparse mode. Prints
// the step time, the resident bytes of weights and caches, and how many 32K-token sequences fit in
// 100 GiB under each cache (counted from resident bytes).
//
// What is simplified, so that a 32-layer, 32K run fits one GPU and a few minutes:
// - the caches are made for ONE group of 4 layers (synthetic Llama-like keys/values) and layer l
//   attends over group layer l mod 4 — each layer's attention does the same work as with its own
//   cache; resident bytes are counted for all 32 layers (the group's bytes × 8);
// - the batch's sequences share that cache (the work per sequence is the same; bytes are counted per
//   sequence); the step's new key/value is projected (its cost is in the step) but not appended;
// - embeddings, the LM head and RoPE of the query are left out (no vocabulary; random queries).
//
//   bash scripts/gpu/bundle.sh scripts/gpu/model-decode-bench.ts decode-bundle        (here, after pnpm build)
//   bash decode-bundle/run.sh --json /tmp/decode.json                                (on the GPU host)
//   KVPACK_DAWN_NODE=decode-bundle/dawn.node node decode-bundle/entry.cjs --small     (local smoke run, lavapipe)
import { writeFileSync } from 'node:fs';
import * as tf from '@tensorflow/tfjs-core';
import { Command } from 'commander';
import {
  HalfTensor,
  applyRope,
  createStrategy,
  describeBackend,
  disposeKVCache,
  runWgsl,
  selectBackend,
  wgslValidationErrors,
  type CompressedCache,
  type ModelLayout,
} from '@kvpack/core';
import { LLAMA31_8B_LAYOUT, attentionReadyLayer, decodeModes, denseDecodeStep, disposeAttentionReady, syntheticLlamaCache, timeOp } from '@kvpack/bench';

interface ModelShape {
  layers: number;
  hidden: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  ffn: number;
}

const LLAMA31_8B: ModelShape = { layers: 32, hidden: 4096, heads: 32, kvHeads: 8, headDim: 128, ffn: 14336 };
const SMALL: ModelShape = { layers: 4, hidden: 1024, heads: 8, kvHeads: 2, headDim: 128, ffn: 2048 };

/** Rows (outputs) per workgroup of the matvec: one 32-lane group per row. */
const MV_ROWS = 8;
const MV_LANES = 32;
/** K values staged per chunk in workgroup memory. */
const MV_CHUNK = 256;

/**
 * y [B, N] = x [B, K] · Wᵀ with W [N, K] held as packed float16 (two halves per int32 word, row-major),
 * unpacked in the kernel (`unpack2x16float`): each 32-lane group reduces one output row over K,
 * reading W coalesced once for the whole batch; x is staged in workgroup memory chunk by chunk.
 */
function halfMatvec(x: tf.Tensor2D, W: HalfTensor): tf.Tensor2D {
  const [B, K] = x.shape;
  const [N, K2] = W.shape;
  if (K !== K2 || K % MV_CHUNK !== 0) throw new Error(`halfMatvec: x [${x.shape}] does not fit W [${W.shape}] (K a multiple of ${MV_CHUNK})`);
  const wordsPerLane = MV_CHUNK / 2 / MV_LANES;
  const accs = Array.from({ length: B }, (_, b) => b);
  const code = `
var<workgroup> xs: array<f32, ${B * MV_CHUNK}>;
var<workgroup> red: array<f32, ${MV_ROWS * MV_LANES * B}>;
fn kernel(index: i32) {
  let lid = localIndex;
  let row = lid / ${MV_LANES}u;
  let lane = lid % ${MV_LANES}u;
  let n = workgroupId.x * ${MV_ROWS}u + row;
  let nOk = n < ${N}u;
  let rowWord = min(n, ${N - 1}u) * ${K / 2}u;
${accs.map((b) => `  var a${b} = 0.0;`).join('\n')}
  for (var c = 0u; c < ${K / MV_CHUNK}u; c++) {
    for (var i = lid; i < ${B * MV_CHUNK}u; i += ${MV_ROWS * MV_LANES}u) {
      let b = i / ${MV_CHUNK}u;
      xs[i] = X[b * ${K}u + c * ${MV_CHUNK}u + i % ${MV_CHUNK}u];
    }
    workgroupBarrier();
    for (var j = 0u; j < ${wordsPerLane}u; j++) {
      let w = j * ${MV_LANES}u + lane;
      let h = unpack2x16float(bitcast<u32>(W[rowWord + c * ${MV_CHUNK / 2}u + w]));
      let k = 2u * w;
${accs.map((b) => `      a${b} = fma(h.x, xs[${b * MV_CHUNK}u + k], fma(h.y, xs[${b * MV_CHUNK}u + k + 1u], a${b}));`).join('\n')}
    }
    workgroupBarrier();
  }
${accs.map((b) => `  red[(${b}u * ${MV_ROWS}u + row) * ${MV_LANES}u + lane] = a${b};`).join('\n')}
  workgroupBarrier();
  if (lane < ${B}u && nOk) {
    var s = 0.0;
    let base = (lane * ${MV_ROWS}u + row) * ${MV_LANES}u;
    for (var l = 0u; l < ${MV_LANES}u; l++) { s += red[base + l]; }
    result[lane * ${N}u + n] = s;
  }
}`;
  return runWgsl({
    key: `model_half_matvec_${B}x${K}x${N}`,
    names: ['X', 'W'],
    inputs: [x, W.packed],
    outputShape: [B, N],
    dtype: 'float32',
    workgroupSize: MV_ROWS * MV_LANES,
    dispatch: [Math.ceil(N / MV_ROWS), 1, 1],
    workgroupBytes: 4 * (B * MV_CHUNK + MV_ROWS * MV_LANES * B),
    code,
  }) as tf.Tensor2D;
}

/** float32 x·Wᵀ reference on the host for the self-check. */
async function checkMatvec(): Promise<number> {
  const B = 3;
  const K = 512;
  const N = 37;
  const x = tf.randomNormal([B, K], 0, 1, 'float32', 3) as tf.Tensor2D;
  const w = tf.randomNormal([N, K], 0, 0.05, 'float32', 4);
  const W = await HalfTensor.fromTensor(w);
  const y = halfMatvec(x, W);
  const wr = W.unpack();
  const [got, xs, ws] = await Promise.all([y.data(), x.data(), wr.data()]);
  tf.dispose([x, w, y, wr]);
  W.dispose();
  let worst = 0;
  for (let b = 0; b < B; b++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      let m = 0;
      for (let k = 0; k < K; k++) {
        s += xs[b * K + k] * ws[n * K + k];
        m += Math.abs(xs[b * K + k] * ws[n * K + k]);
      }
      worst = Math.max(worst, Math.abs(got[b * N + n] - s) / m);
    }
  return worst;
}

interface Layer {
  wqkv: HalfTensor;
  wo: HalfTensor;
  wgu: HalfTensor;
  wd: HalfTensor;
}

async function randomHalf(n: number, k: number, seed: number): Promise<HalfTensor> {
  const w = tf.randomNormal([n, k], 0, 1 / Math.sqrt(k), 'float32', seed);
  try {
    return await HalfTensor.fromTensor(w);
  } finally {
    w.dispose();
  }
}

function rmsNorm(x: tf.Tensor2D): tf.Tensor2D {
  return tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.square(x), 1, true), 1e-5))) as tf.Tensor2D;
}

/** Attention of the batch's queries q [B, H, d] for model layer `layer`. */
type Attend = (layer: number, q: tf.Tensor3D) => tf.Tensor3D;

/** One decode step of the whole stack for hidden states x [B, hidden]; returns the new x. */
function decodeStep(m: ModelShape, weights: Layer[], x0: tf.Tensor2D, attend: Attend): tf.Tensor2D {
  return tf.tidy(() => {
    const B = x0.shape[0];
    const qd = m.heads * m.headDim;
    const kvd = m.kvHeads * m.headDim;
    let x = x0;
    for (let l = 0; l < m.layers; l++) {
      const w = weights[l];
      const qkv = halfMatvec(rmsNorm(x), w.wqkv); // [B, qd + 2·kvd]; the new key/value is not appended
      const q = tf.reshape(tf.slice(qkv, [0, 0], [B, qd]), [B, m.heads, m.headDim]) as tf.Tensor3D;
      void kvd;
      const o = tf.reshape(attend(l, q), [B, qd]) as tf.Tensor2D;
      x = tf.add(x, halfMatvec(o, w.wo)) as tf.Tensor2D;
      const gu = halfMatvec(rmsNorm(x), w.wgu); // [B, 2·ffn]
      const g = tf.slice(gu, [0, 0], [B, m.ffn]);
      const u = tf.slice(gu, [0, m.ffn], [B, m.ffn]);
      const act = tf.mul(tf.mul(g, tf.sigmoid(g)), u) as tf.Tensor2D;
      x = tf.add(x, halfMatvec(act, w.wd)) as tf.Tensor2D;
    }
    return x;
  });
}

/** Per-sequence attention over the batch: each row of q [B, H, d] through `one` ([1, H, d] → [1, H, d]). */
function perSequence(one: (layer: number, q: tf.Tensor3D) => tf.Tensor3D): Attend {
  return (layer, q) => {
    const B = q.shape[0];
    if (B === 1) return one(layer, q);
    return tf.concat(tf.split(q, B, 0).map((qb) => one(layer, qb as tf.Tensor3D)), 0) as tf.Tensor3D;
  };
}

const GiB = 2 ** 30;

async function main(): Promise<void> {
  const program = new Command('model-decode-bench')
    .option('--backend <name>', 'tfjs backend (webgpu: the matvec is a WGSL kernel)', 'webgpu')
    .option('--small', 'local smoke run (lavapipe): 4 layers, hidden 1024, 8/2 heads, FFN 2048, T = 1024, ranks 16/24, budget 256')
    .option('--tokens <n>', 'context T (default 32768; --small 1024)')
    .option('--batches <list>', 'batch sizes', '1,8')
    .option('--sparse-budget <n>', 'xKV sparse decode budget (default 2048; --small 256)')
    .option('--rank-k <n>', 'xKV key rank per layer (group rank ×4; default 128 = the paper’s 512; --small 16)')
    .option('--rank-v <n>', 'xKV value rank per layer (default 192 = the paper’s 768; --small 24)')
    .option('--caches <list>', 'caches to time: dense, xkv-full, xkv-sparse', 'dense,xkv-full,xkv-sparse')
    .option('--reps <n>', 'timed steps (default 5; --small 1)')
    .option('--warmup <n>', 'warm-up steps (default 2; --small 1)')
    .option('--budget-gib <n>', 'memory budget for the sequence count, GiB', '100')
    .option('--json <file>', 'write the results as JSON')
    .parse(process.argv);
  const a = program.opts<{
    backend: string;
    small?: boolean;
    tokens?: string;
    batches: string;
    sparseBudget?: string;
    rankK?: string;
    rankV?: string;
    caches: string;
    reps?: string;
    warmup?: string;
    budgetGib: string;
    json?: string;
  }>();
  const small = Boolean(a.small);
  const choice = await selectBackend(a.backend);
  console.log(describeBackend(choice));
  if (choice.name !== 'webgpu') throw new Error('model-decode-bench needs the webgpu backend (the float16 matvec is a WGSL kernel)');
  const m = small ? SMALL : LLAMA31_8B;
  const T = Number(a.tokens ?? (small ? 1024 : 32768));
  const budget = Number(a.sparseBudget ?? (small ? 256 : 2048));
  const rankK = Number(a.rankK ?? (small ? 16 : 128));
  const rankV = Number(a.rankV ?? (small ? 24 : 192));
  const reps = Number(a.reps ?? (small ? 1 : 5));
  const warmup = Number(a.warmup ?? (small ? 1 : 2));
  const batches = a.batches.split(',').map((s) => Number(s.trim()));
  const caches = a.caches.split(',').map((s) => s.trim());
  const budgetBytes = Number(a.budgetGib) * GiB;
  const matvecErr = await checkMatvec();
  console.log(`float16 matvec self-check: max error ${matvecErr.toExponential(2)} of Σ|x·w| (float32 accumulation)`);
  if (!(matvecErr < 1e-5)) throw new Error(`the float16 matvec is wrong (error ${matvecErr})`);

  // Weights, float16 packed.
  let t0 = performance.now();
  const weights: Layer[] = [];
  const qd = m.heads * m.headDim;
  const kvd = m.kvHeads * m.headDim;
  for (let l = 0; l < m.layers; l++)
    weights.push({
      wqkv: await randomHalf(qd + 2 * kvd, m.hidden, 10 * l + 1),
      wo: await randomHalf(m.hidden, qd, 10 * l + 2),
      wgu: await randomHalf(2 * m.ffn, m.hidden, 10 * l + 3),
      wd: await randomHalf(m.hidden, m.ffn, 10 * l + 4),
    });
  const weightBytes = weights.reduce((s, w) => s + w.wqkv.residentBytes + w.wo.residentBytes + w.wgu.residentBytes + w.wd.residentBytes, 0);
  console.log(`weights: ${m.layers} layers, ${(weightBytes / GiB).toFixed(2)} GiB float16 (made in ${(performance.now() - t0).toFixed(0)} ms)`);

  // One group of 4 layers of keys/values (see the header).
  t0 = performance.now();
  const layout: ModelLayout = { ...LLAMA31_8B_LAYOUT, nLayers: 4, nHeads: m.heads, nKvHeads: m.kvHeads, headDim: m.headDim };
  const cache = await syntheticLlamaCache({ T, layers: 4, layout, seed: 1 });
  console.log(`context: ${T} tokens, one group of 4 layers generated in ${(performance.now() - t0).toFixed(0)} ms`);
  const groupsPerModel = m.layers / 4;
  const rows: Record<string, unknown>[] = [];
  const attends: { name: string; attend: Attend; bytesPerSeq: number; note: string; dispose(): void }[] = [];
  if (caches.includes('dense')) {
    const ready = cache.keys.map((k, i) => {
      const kr = applyRope(k, cache.rope, { start: 0, count: T });
      const r = attentionReadyLayer(kr, cache.values[i]);
      kr.dispose();
      return r;
    });
    // A serving stack holds the dense cache in float16: 2 bytes per element (this run holds float32).
    const bytes = 2 * 2 * T * kvd * m.layers;
    attends.push({
      name: 'dense',
      attend: perSequence((l, q) => denseDecodeStep(q, ready[l % 4])),
      bytesPerSeq: bytes,
      note: 'float16 K+V counted (2 B/element); attention over float32 here',
      dispose: () => ready.forEach(disposeAttentionReady),
    });
  }
  const xkvCaches: CompressedCache[] = [];
  for (const mode of ['full', 'sparse'] as const) {
    if (!caches.includes(`xkv-${mode}`)) continue;
    t0 = performance.now();
    const strategy = createStrategy({
      name: 'xkv',
      options: { layersPerGroup: 4, rankK: rankK, rankV: rankV, ...(mode === 'sparse' ? { decode: 'sparse', sparse: { budget } } : {}) },
    });
    const c = await strategy.compress(cache);
    xkvCaches.push(c);
    const modes = decodeModes(c, { sparseBudget: budget });
    const pick = mode === 'sparse' ? modes.find((x) => x.mode === 'sparse') : (modes.find((x) => x.mode === 'attend-full') ?? modes.find((x) => x.mode === 'attend') ?? modes[0]);
    if (!pick) {
      console.log(`xkv ${mode}: no such decode mode in this build`);
      continue;
    }
    attends.push({
      name: `xkv-${mode}`,
      attend: perSequence((l, q) => pick.step(l % 4, q)),
      bytesPerSeq: c.byteSize() * groupsPerModel,
      note: `${pick.label}; rank ${4 * rankK}/${4 * rankV} per group; compressed in ${(performance.now() - t0).toFixed(0)} ms`,
      dispose: () => pick.dispose?.(),
    });
  }

  console.log(`\n| cache | batch | step ms | tokens/s | resident cache / sequence (GiB) | weights + batch caches (GiB) | ${T}-token sequences in ${a.budgetGib} GiB (after weights) | note |`);
  console.log('| --- | --- | --- | --- | --- | --- | --- | --- |');
  for (const B of batches) {
    const x = tf.randomNormal([B, m.hidden], 0, 1, 'float32', 99) as tf.Tensor2D;
    for (const c of attends) {
      try {
        const t = await timeOp(() => decodeStep(m, weights, x, c.attend), { reps, warmup });
        const fit = Math.floor((budgetBytes - weightBytes) / c.bytesPerSeq);
        const row = { cache: c.name, batch: B, T, stepMs: t.medianMs, samplesMs: t.samplesMs, tokensPerS: (B * 1000) / t.medianMs, bytesPerSeq: c.bytesPerSeq, weightBytes, sequencesIn100GiB: fit, note: c.note };
        rows.push(row);
        console.log(
          `| ${c.name} | ${B} | ${t.medianMs.toFixed(1)} | ${row.tokensPerS.toFixed(1)} | ${(c.bytesPerSeq / GiB).toFixed(3)} | ${((weightBytes + B * c.bytesPerSeq) / GiB).toFixed(2)} | ${fit} | ${c.note} |`,
        );
      } catch (e) {
        console.log(`| ${c.name} | ${B} | failed: ${(e as Error).message.split('\n')[0]} | | | | | |`);
      }
    }
    x.dispose();
  }
  console.log(
    `\nshape: ${m.layers} layers, hidden ${m.hidden}, ${m.heads}/${m.kvHeads} heads × ${m.headDim}, FFN ${m.ffn}; T = ${T}. ` +
      'Caches of one 4-layer group reused by every group and by every sequence of the batch (bytes counted for all layers and sequences); no embeddings / LM head / query RoPE; the new token is not appended.',
  );
  for (const c of attends) c.dispose();
  for (const c of xkvCaches) c.dispose();
  disposeKVCache(cache);
  for (const w of weights) for (const h of [w.wqkv, w.wo, w.wgu, w.wd]) h.dispose();
  const bad = await wgslValidationErrors();
  if (bad.length) console.log(`WGSL validation errors:\n${bad.join('\n')}`);
  const result = { kind: 'model-decode-bench', backend: choice.name, shape: m, T, sparseBudget: budget, weightBytes, rows, validationErrors: bad, numTensors: tf.memory().numTensors };
  if (a.json) writeFileSync(a.json, `${JSON.stringify(result, null, 1)}\n`);
  console.log(JSON.stringify({ kind: result.kind, numTensors: result.numTensors, rows: rows.map((r) => [r.cache, r.batch, Number((r.stepMs as number).toFixed(2))]) }));
}

main().catch((e: unknown) => {
  console.error(`model-decode-bench: ${(e as Error)?.stack ?? String(e)}`);
  process.exit(1);
});
