import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { LlamaModel } from '../model/index.js';
import { loadLlama2cCheckpoint } from '../llama2c/index.js';
import { loadHfWeights } from '../hf/load.js';
import { disposeLlamaWeights } from '../hf/weights.js';
import { MODELS_DIR, tinyCheckpoint, writeHfDir, type TinyCheckpoint, type TinySpec } from '../hf/testutil.js';
import type { LlamaWeights } from '../types.js';
import { ggufConfig, loadGgufModel, readGgufHeader } from './load.js';
import { encodeGguf, f16Bytes, f32Bytes, quantizeQ4_0, quantizeQ8_0, type GgufKV, type GgufTensorSpec } from './testutil.js';

const F32 = 0;
const F16 = 1;
const Q4_0 = 2;
const Q4_1 = 3;
const Q8_0 = 8;

// ---- float64 reference dequantization, written plainly from ggml-common.h's block layouts ----
function half(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 31;
  const m = h & 1023;
  if (e === 0) return s * m * 2 ** -24;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}
function refDequant(type: number, b: Uint8Array, n: number): Float64Array {
  const out = new Float64Array(n);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (type === F32) for (let i = 0; i < n; i++) out[i] = dv.getFloat32(4 * i, true);
  else if (type === F16) for (let i = 0; i < n; i++) out[i] = half(dv.getUint16(2 * i, true));
  else if (type === Q8_0)
    for (let blk = 0; blk < n / 32; blk++) {
      const d = half(dv.getUint16(34 * blk, true));
      for (let j = 0; j < 32; j++) out[32 * blk + j] = dv.getInt8(34 * blk + 2 + j) * d;
    }
  else if (type === Q4_0)
    for (let blk = 0; blk < n / 32; blk++) {
      const d = half(dv.getUint16(18 * blk, true));
      for (let j = 0; j < 16; j++) {
        const byte = b[18 * blk + 2 + j];
        out[32 * blk + j] = ((byte & 15) - 8) * d;
        out[32 * blk + 16 + j] = ((byte >> 4) - 8) * d;
      }
    }
  else throw new Error(`no reference for type ${type}`);
  return out;
}

// ---- convert_hf_to_gguf.py's q/k row permutation (rotate-half → interleaved pairs) ----
/** Row r' = h·d + 2i + s of the GGUF matrix is row h·d + s·d/2 + i of the HF one. */
function permuteRows(x: Float32Array, rows: number, cols: number, heads: number, inverse = false): Float32Array {
  const out = new Float32Array(x.length);
  const d = rows / heads;
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < d / 2; i++)
      for (let s = 0; s < 2; s++) {
        const g = h * d + 2 * i + s;
        const f = h * d + s * (d / 2) + i;
        const [dst, src] = inverse ? [f, g] : [g, f];
        out.set(x.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
  return out;
}

const GGUF_NAMES: [RegExp, string][] = [
  [/^model\.embed_tokens\.weight$/, 'token_embd.weight'],
  [/^model\.norm\.weight$/, 'output_norm.weight'],
  [/^lm_head\.weight$/, 'output.weight'],
  [/^model\.layers\.(\d+)\.input_layernorm\.weight$/, 'blk.$1.attn_norm.weight'],
  [/^model\.layers\.(\d+)\.post_attention_layernorm\.weight$/, 'blk.$1.ffn_norm.weight'],
  [/^model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$/, 'blk.$1.attn_q.$2'],
  [/^model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)$/, 'blk.$1.attn_k.$2'],
  [/^model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)$/, 'blk.$1.attn_v.$2'],
  [/^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$/, 'blk.$1.attn_output.weight'],
  [/^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$/, 'blk.$1.ffn_gate.weight'],
  [/^model\.layers\.(\d+)\.mlp\.up_proj\.weight$/, 'blk.$1.ffn_up.weight'],
  [/^model\.layers\.(\d+)\.mlp\.down_proj\.weight$/, 'blk.$1.ffn_down.weight'],
];
function ggufName(hf: string): string {
  for (const [re, to] of GGUF_NAMES) if (re.test(hf)) return hf.replace(re, to);
  throw new Error(hf);
}

interface Converted {
  bytes: Uint8Array;
  /** What each GGUF tensor dequantizes to (float64, GGUF row order, [out, in]). */
  stored: Map<string, { shape: number[]; values: Float64Array }>;
  /** The same weights in the HF layout (q/k un-permuted), float32-exact. */
  effective: TinyCheckpoint;
}

/**
 * Writes a checkpoint as llama.cpp would (convert_hf_to_gguf.py): llama.cpp names, q/k rows permuted
 * for `llama`, ne = reversed shape, 1-D tensors F32, matrices in the type `typeOf` picks.
 */
function toGguf(ck: TinyCheckpoint, arch: 'llama' | 'qwen2', typeOf: (gguf: string) => number, extraKv: GgufKV[] = []): Converted {
  const c = ck.config as Record<string, number>;
  const H = c.num_attention_heads;
  const Hkv = c.num_key_value_heads;
  const tensors: GgufTensorSpec[] = [];
  const stored = new Map<string, { shape: number[]; values: Float64Array }>();
  const effective: TinyCheckpoint = { config: ck.config, tensors: new Map() };
  for (const [hf, t] of ck.tensors) {
    const name = ggufName(hf);
    let data = t.data;
    const heads = /attn_q\.weight/.test(name) ? H : /attn_k\.weight/.test(name) ? Hkv : 0;
    if (arch === 'llama' && heads) data = permuteRows(data, t.shape[0], t.shape[1], heads);
    const type = t.shape.length === 1 ? F32 : typeOf(name);
    const bytes = type === F32 ? f32Bytes(data) : type === F16 ? f16Bytes(data) : type === Q8_0 ? quantizeQ8_0(data) : quantizeQ4_0(data);
    tensors.push({ name, ne: [...t.shape].reverse(), type, data: bytes });
    const values = refDequant(type, bytes, data.length);
    stored.set(name, { shape: t.shape, values });
    let eff: Float32Array = Float32Array.from(values);
    if (arch === 'llama' && heads) eff = permuteRows(eff, t.shape[0], t.shape[1], heads, true);
    effective.tensors.set(hf, { shape: t.shape, data: eff });
  }
  const a = (k: string) => `${arch}.${k}`;
  const tokens = ['<unk>', '<s>', '</s>'];
  for (let i = tokens.length; i < c.vocab_size; i++) tokens.push(`▁t${i}`);
  const kvs: GgufKV[] = [
    { key: 'general.architecture', type: 'string', value: arch },
    { key: 'general.name', type: 'string', value: 'kvpack test model' },
    { key: a('context_length'), type: 'u32', value: c.max_position_embeddings },
    { key: a('embedding_length'), type: 'u32', value: c.hidden_size },
    { key: a('block_count'), type: 'u32', value: c.num_hidden_layers },
    { key: a('feed_forward_length'), type: 'u32', value: c.intermediate_size },
    { key: a('attention.head_count'), type: 'u32', value: H },
    { key: a('attention.head_count_kv'), type: 'u32', value: Hkv },
    { key: a('rope.freq_base'), type: 'f32', value: c.rope_theta },
    { key: a('attention.layer_norm_rms_epsilon'), type: 'f32', value: c.rms_norm_eps },
    { key: 'tokenizer.ggml.model', type: 'string', value: 'llama' },
    { key: 'tokenizer.ggml.tokens', type: 'strings', value: tokens },
    { key: 'tokenizer.ggml.scores', type: 'f32s', value: tokens.map((_, i) => -i) },
    { key: 'tokenizer.ggml.token_type', type: 'i32s', value: tokens.map((_, i) => (i === 0 ? 2 : i < 3 ? 3 : 1)) },
    { key: 'tokenizer.ggml.bos_token_id', type: 'u32', value: 1 },
    { key: 'tokenizer.ggml.eos_token_id', type: 'u32', value: 2 },
    ...extraKv,
  ];
  return { bytes: encodeGguf(kvs, tensors), stored, effective };
}

/** Row-major [out, in] float64 → the [in, out] float32 layout kvpack keeps. */
function transposed(v: Float64Array, out: number, inn: number): Float32Array {
  const r = new Float32Array(v.length);
  for (let o = 0; o < out; o++) for (let i = 0; i < inn; i++) r[i * out + o] = v[o * inn + i];
  return r;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

const LLAMA: TinySpec = { dim: 64, hiddenDim: 96, nLayers: 2, nHeads: 4, nKvHeads: 2, vocabSize: 96, ropeTheta: 10000 };
const llamaTypes = (n: string): number => {
  if (n === 'token_embd.weight') return F16;
  if (n === 'output.weight') return Q8_0;
  const table: Record<string, number[]> = {
    attn_q: [Q8_0, Q4_0],
    attn_k: [Q4_0, Q8_0],
    attn_v: [F16, F32],
    attn_output: [Q4_0, F16],
    ffn_gate: [Q8_0, Q4_0],
    ffn_up: [Q4_0, Q8_0],
    ffn_down: [Q8_0, F32],
  };
  const m = /^blk\.(\d+)\.(\w+)\.weight$/.exec(n)!;
  return table[m[2]][Number(m[1])];
};

let dir: string;
beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-gguf-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function logitsOf(w: LlamaWeights, ids: number[]): Promise<Float32Array> {
  const m = new LlamaModel(w);
  const r = await m.prefill(ids);
  const out = (await r.logits.data()) as Float32Array;
  r.logits.dispose();
  tf.dispose([...r.cache.keys, ...r.cache.values]);
  return out;
}

describe('GGUF loader (llama, F32/F16/Q8_0/Q4_0, test-written file)', () => {
  const ck = tinyCheckpoint(LLAMA, 7);
  const conv = toGguf(ck, 'llama', llamaTypes);
  const ids = [1, 5, 17, 33, 2, 90, 64, 8, 41, 77, 12, 3];

  it('maps the metadata to the config (interleaved RoPE for llama.cpp-permuted q/k)', async () => {
    const file = join(dir, 'tiny.gguf');
    writeFileSync(file, conv.bytes);
    const cfg = await ggufConfig(await readGgufHeader(file));
    expect(cfg).toMatchObject({
      nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 16, dim: 64, hiddenDim: 96, vocabSize: 96, maxSeqLen: 256,
      tiedEmbeddings: false, qkvBias: false, bosId: 1, eosId: 2,
      rope: { theta: 10000, layout: 'interleaved', scaling: null },
    });
    expect(cfg.normEps).toBeCloseTo(1e-5, 10);
  });

  it('dequantizes every tensor to the float64 reference and transposes to [in, out]', async () => {
    const file = join(dir, 'tiny.gguf');
    writeFileSync(file, conv.bytes);
    const { weights } = await loadGgufModel(file);
    const check = (t: tf.Tensor, name: string) => {
      const ref = conv.stored.get(name)!;
      const want = ref.shape.length === 2 && name !== 'token_embd.weight' ? transposed(ref.values, ref.shape[0], ref.shape[1]) : ref.values;
      const got = t.dataSync();
      expect(got.length, name).toBe(want.length);
      expect(maxAbsDiff(got, want), name).toBe(0); // every dequantized value is exact in float32
    };
    check(weights.embedding, 'token_embd.weight');
    check(weights.classifier, 'output.weight');
    check(weights.finalNorm, 'output_norm.weight');
    weights.layers.forEach((l, i) => {
      const p = `blk.${i}.`;
      check(l.wq, p + 'attn_q.weight');
      check(l.wk, p + 'attn_k.weight');
      check(l.wv, p + 'attn_v.weight');
      check(l.wo, p + 'attn_output.weight');
      check(l.w1, p + 'ffn_gate.weight');
      check(l.w2, p + 'ffn_down.weight');
      check(l.w3, p + 'ffn_up.weight');
      check(l.attnNorm, p + 'attn_norm.weight');
      check(l.ffnNorm, p + 'ffn_norm.weight');
    });
    disposeLlamaWeights(weights);
  });

  it('gives the same logits as the same weights written as HF safetensors', async () => {
    const file = join(dir, 'tiny.gguf');
    writeFileSync(file, conv.bytes);
    const hfDir = join(dir, 'tiny-hf');
    writeHfDir(hfDir, conv.effective, { shards: 2 });
    const start = tf.memory().numTensors;
    const g = await loadGgufModel(file);
    const a = await logitsOf(g.weights, ids);
    const hf = await loadHfWeights(hfDir);
    const b = await logitsOf(hf, ids);
    let scale = 0;
    for (const v of b) scale = Math.max(scale, Math.abs(v));
    expect(scale).toBeGreaterThan(0.5);
    const diff = maxAbsDiff(a, b);
    console.log(`GGUF (interleaved, permuted q/k) vs HF (half) logits: max |Δ| = ${diff.toExponential(2)}, max |logit| = ${scale.toFixed(2)}`);
    expect(diff).toBeLessThan(1e-4 * scale);
    // Negative control: the permuted weights run with the HF layout give different logits.
    const wrong = { ...g.weights, config: { ...g.weights.config, rope: { ...g.weights.config.rope, layout: 'half' as const } } };
    const c = await logitsOf(wrong, ids);
    expect(maxAbsDiff(c, b)).toBeGreaterThan(1e-2 * scale);
    disposeLlamaWeights(g.weights);
    disposeLlamaWeights(hf);
    expect(tf.memory().numTensors).toBe(start);
  });

  it('Qwen2 (no permutation, q/k/v biases, tied embeddings) matches its HF checkpoint', async () => {
    const spec: TinySpec = { ...LLAMA, arch: 'Qwen2ForCausalLM', tied: true, ropeTheta: 1e6 };
    const qk = tinyCheckpoint(spec, 11);
    const qc = toGguf(qk, 'qwen2', (n) => (n.includes('attn_q') ? Q4_0 : n.includes('ffn') ? Q8_0 : F16));
    const file = join(dir, 'qwen2.gguf');
    writeFileSync(file, qc.bytes);
    const hfDir = join(dir, 'qwen2-hf');
    writeHfDir(hfDir, qc.effective);
    const g = await loadGgufModel(file);
    expect(g.config).toMatchObject({ qkvBias: true, tiedEmbeddings: true, rope: { layout: 'half', theta: 1e6 } });
    const a = await logitsOf(g.weights, ids);
    const hf = await loadHfWeights(hfDir);
    const b = await logitsOf(hf, ids);
    let scale = 0;
    for (const v of b) scale = Math.max(scale, Math.abs(v));
    expect(maxAbsDiff(a, b)).toBeLessThan(1e-4 * scale);
    disposeLlamaWeights(g.weights);
    disposeLlamaWeights(hf);
  });

  it('reads linear RoPE scaling and recognises a Llama 3 rope_freqs table', async () => {
    const lin = toGguf(ck, 'llama', llamaTypes, [
      { key: 'llama.rope.scaling.type', type: 'string', value: 'linear' },
      { key: 'llama.rope.scaling.factor', type: 'f32', value: 4 },
    ]);
    const f1 = join(dir, 'linear.gguf');
    writeFileSync(f1, lin.bytes);
    expect((await ggufConfig(await readGgufHeader(f1))).rope.scaling).toEqual({ type: 'linear', factor: 4 });

    // llama.cpp's rope_freqs for Llama 3.1 (factor 8, low 1, high 4, original 8192), computed here
    // from the formula in transformers' _compute_llama3_parameters, float64.
    const d = 16;
    const theta = 500000;
    const freqs: number[] = [];
    for (let i = 0; i < d / 2; i++) {
      const inv = 1 / theta ** ((2 * i) / d);
      const wavelen = (2 * Math.PI) / inv;
      const low = 8192 / 1;
      const high = 8192 / 4;
      let scaled: number;
      if (wavelen < high) scaled = inv;
      else if (wavelen > low) scaled = inv / 8;
      else {
        const smooth = (8192 / wavelen - 1) / (4 - 1);
        scaled = (1 - smooth) * (inv / 8) + smooth * inv;
      }
      freqs.push(inv / scaled);
    }
    const spec: TinySpec = { ...LLAMA, ropeTheta: theta };
    const l3 = tinyCheckpoint(spec, 3);
    const conv3 = toGguf(l3, 'llama', () => F32);
    // Append rope_freqs.weight by re-encoding with the extra tensor.
    const header = await (async () => {
      const f = join(dir, 'l3base.gguf');
      writeFileSync(f, conv3.bytes);
      return readGgufHeader(f);
    })();
    const kvs: GgufKV[] = Object.entries(header.metadata)
      .filter(([k]) => !['version', 'tensor_count', 'kv_count'].includes(k))
      .map(([key, v]) =>
        typeof v === 'string'
          ? { key, type: 'string', value: v }
          : Array.isArray(v)
            ? typeof v[0] === 'string'
              ? { key, type: 'strings', value: v as string[] }
              : key.endsWith('token_type')
                ? { key, type: 'i32s', value: v as number[] }
                : { key, type: 'f32s', value: v as number[] }
            : Number.isInteger(v)
              ? { key, type: 'u32', value: v as number }
              : { key, type: 'f32', value: v as number },
      );
    const tensors: GgufTensorSpec[] = [...l3.tensors].map(([hf, t]) => ({ name: ggufName(hf), ne: [...t.shape].reverse(), type: F32, data: f32Bytes(t.data) }));
    tensors.push({ name: 'rope_freqs.weight', ne: [d / 2], type: F32, data: f32Bytes(Float32Array.from(freqs)) });
    const f2 = join(dir, 'llama3.gguf');
    writeFileSync(f2, encodeGguf(kvs, tensors));
    const cfg = await ggufConfig(await readGgufHeader(f2));
    expect(cfg.rope.theta).toBeCloseTo(theta, 0);
    expect(cfg.rope.scaling).toEqual({ type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
  });

  it('rejects unsupported tensor types, naming the tensor and type', async () => {
    // Re-encode with blk.0.attn_q.weight declared Q4_1 (20-byte blocks).
    const t = ck.tensors.get('model.layers.0.self_attn.q_proj.weight')!;
    const kvs: GgufKV[] = [
      { key: 'general.architecture', type: 'string', value: 'llama' },
      { key: 'llama.embedding_length', type: 'u32', value: 64 },
      { key: 'llama.block_count', type: 'u32', value: 2 },
      { key: 'llama.feed_forward_length', type: 'u32', value: 96 },
      { key: 'llama.attention.head_count', type: 'u32', value: 4 },
      { key: 'llama.attention.head_count_kv', type: 'u32', value: 2 },
    ];
    const tensors: GgufTensorSpec[] = [...ck.tensors].map(([hf, x]) => ({ name: ggufName(hf), ne: [...x.shape].reverse(), type: F32, data: f32Bytes(x.data) }));
    const qi = tensors.findIndex((x) => x.name === 'blk.0.attn_q.weight');
    tensors[qi] = { name: 'blk.0.attn_q.weight', ne: [...t.shape].reverse(), type: Q4_1, data: new Uint8Array((t.data.length / 32) * 20) };
    const file = join(dir, 'q41.gguf');
    writeFileSync(file, encodeGguf(kvs, tensors));
    const start = tf.memory().numTensors;
    const err = await loadGgufModel(file).catch((e) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect(err.code).toBe('unsupported');
    expect(err.message).toContain('blk.0.attn_q.weight');
    expect(err.message).toContain('Q4_1');
    expect(err.message).toContain('q41.gguf');
    expect(tf.memory().numTensors).toBe(start);
  });

  it('rejects truncated files and tensors that disagree with the metadata', async () => {
    const cut = join(dir, 'cut.gguf');
    writeFileSync(cut, conv.bytes.subarray(0, conv.bytes.length - 100));
    const e1 = await loadGgufModel(cut).catch((e) => e);
    expect(e1).toBeInstanceOf(KvpackError);
    expect(e1.code).toBe('truncated');
    expect(e1.message).toMatch(/cut\.gguf is truncated: tensor "[^"]+" ends at byte/);

    const head = join(dir, 'head.gguf');
    writeFileSync(head, conv.bytes.subarray(0, 200));
    const e2 = await loadGgufModel(head).catch((e) => e);
    expect(e2).toBeInstanceOf(KvpackError);
    expect(e2.code).toBe('truncated');
    expect(e2.message).toContain('head.gguf');

    const wrong = toGguf(ck, 'llama', llamaTypes, []);
    // Claim a larger FFN than the tensors have: llama.feed_forward_length is written once; patch it.
    const text = Buffer.from(wrong.bytes);
    const key = Buffer.from('llama.feed_forward_length');
    const at = text.indexOf(key) + key.length + 4; // skip the value type
    text.writeUInt32LE(128, at);
    const ffn = join(dir, 'ffn.gguf');
    writeFileSync(ffn, text);
    const e3 = await loadGgufModel(ffn).catch((e) => e);
    expect(e3).toBeInstanceOf(KvpackError);
    expect(e3.code).toBe('shape');
    expect(e3.message).toMatch(/ffn\.gguf: tensor "blk\.0\.ffn_\w+\.weight" has shape \[\d+,\d+\] but the GGUF metadata implies \[\d+,\d+\]/);

    const junk = join(dir, 'junk.gguf');
    writeFileSync(junk, Buffer.from('NOPE'.repeat(64)));
    const e4 = await loadGgufModel(junk).catch((e) => e);
    expect(e4).toBeInstanceOf(KvpackError);
    expect(e4.code).toBe('corrupt');
  });
});

// ---- stories260K as GGUF: llama2.c's Meta layout is llama.cpp's layout, so the float64 oracle applies ----
const STORIES = join(MODELS_DIR, 'stories260K');
const haveStories = existsSync(join(STORIES, 'stories260K_q80.bin')) && existsSync(join(STORIES, 'oracle.json'));

describe('stories260K written as GGUF', () => {
  it.skipIf(!haveStories)(`greedy decode matches the float64 oracle${haveStories ? '' : ` (skipped: ${STORIES} is absent)`}`, async () => {
    const src = await loadLlama2cCheckpoint(join(STORIES, 'stories260K_q80.bin'));
    const c = src.config;
    const back = (t: tf.Tensor, transpose: boolean) => {
      const x = t.dataSync() as Float32Array;
      if (!transpose) return x;
      const [inn, out] = t.shape;
      const r = new Float32Array(x.length);
      for (let i = 0; i < inn; i++) for (let o = 0; o < out; o++) r[o * inn + i] = x[i * out + o];
      return r;
    };
    const tensors: GgufTensorSpec[] = [];
    const add = (name: string, t: tf.Tensor, matrix: boolean) => {
      const data = back(t, matrix);
      const shape = matrix ? [t.shape[1]!, t.shape[0]] : [...t.shape];
      // F32: llama2.c's float32 group scales are not representable as Q8_0's float16 scales.
      tensors.push({ name, ne: [...shape].reverse(), type: F32, data: f32Bytes(data) });
    };
    tensors.push({ name: 'token_embd.weight', ne: [c.dim, c.vocabSize], type: F32, data: f32Bytes(src.embedding.dataSync() as Float32Array) });
    add('output_norm.weight', src.finalNorm, false);
    src.layers.forEach((l, i) => {
      const p = `blk.${i}.`;
      add(p + 'attn_norm.weight', l.attnNorm, false);
      add(p + 'attn_q.weight', l.wq, true);
      add(p + 'attn_k.weight', l.wk, true);
      add(p + 'attn_v.weight', l.wv, true);
      add(p + 'attn_output.weight', l.wo, true);
      add(p + 'ffn_norm.weight', l.ffnNorm, false);
      add(p + 'ffn_gate.weight', l.w1, true);
      add(p + 'ffn_down.weight', l.w2, true);
      add(p + 'ffn_up.weight', l.w3, true);
    });
    disposeLlamaWeights(src);
    // tok512.bin: int32 max_len, then per piece float32 score, int32 length, bytes.
    const tb = readFileSync(join(STORIES, 'tok512.bin'));
    const tokens: string[] = [];
    const scores: number[] = [];
    for (let p = 4; p < tb.length; ) {
      scores.push(tb.readFloatLE(p));
      const n = tb.readInt32LE(p + 4);
      tokens.push(tb.subarray(p + 8, p + 8 + n).toString('utf8').replaceAll(' ', '▁'));
      p += 8 + n;
    }
    const kvs: GgufKV[] = [
      { key: 'general.architecture', type: 'string', value: 'llama' },
      { key: 'llama.context_length', type: 'u32', value: c.maxSeqLen },
      { key: 'llama.embedding_length', type: 'u32', value: c.dim },
      { key: 'llama.block_count', type: 'u32', value: c.nLayers },
      { key: 'llama.feed_forward_length', type: 'u32', value: c.hiddenDim },
      { key: 'llama.attention.head_count', type: 'u32', value: c.nHeads },
      { key: 'llama.attention.head_count_kv', type: 'u32', value: c.nKvHeads },
      { key: 'llama.rope.freq_base', type: 'f32', value: 10000 },
      { key: 'llama.attention.layer_norm_rms_epsilon', type: 'f32', value: 1e-5 },
      { key: 'tokenizer.ggml.model', type: 'string', value: 'llama' },
      { key: 'tokenizer.ggml.tokens', type: 'strings', value: tokens },
      { key: 'tokenizer.ggml.scores', type: 'f32s', value: scores },
      { key: 'tokenizer.ggml.token_type', type: 'i32s', value: tokens.map((_, i) => (i === 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1)) },
      { key: 'tokenizer.ggml.bos_token_id', type: 'u32', value: 1 },
      { key: 'tokenizer.ggml.eos_token_id', type: 'u32', value: 2 },
    ];
    const file = join(dir, 'stories260K.gguf');
    writeFileSync(file, encodeGguf(kvs, tensors));
    const oracle = JSON.parse(readFileSync(join(STORIES, 'oracle.json'), 'utf8')) as { greedy_ids: number[]; greedy_text: string; top2_logit_margin: number[] };
    const g = await loadGgufModel(file);
    expect(g.config).toMatchObject({ tiedEmbeddings: true, rope: { layout: 'interleaved' }, nKvHeads: 4, headDim: 8 });
    // Compare greedy ids up to the first step whose oracle margin is under 1e-2 (PROVENANCE.md).
    const firstTight = oracle.top2_logit_margin.findIndex((m) => m < 1e-2);
    const n = firstTight < 0 ? oracle.top2_logit_margin.length : firstTight;
    const model = new LlamaModel(g.weights);
    const r = await model.generate([oracle.greedy_ids[0]], { maxNewTokens: n });
    expect(r.ids).toEqual(oracle.greedy_ids.slice(1, 1 + n));
    expect(g.tokenizer!.decode(oracle.greedy_ids)).toBe(oracle.greedy_text);
    model.dispose();
  });
});
