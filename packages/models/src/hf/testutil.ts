import { mulberry32 } from '@kvpack/core';
// Test helpers (not exported from the package): random Llama checkpoints in the Hugging Face layout.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { encodeSafetensors, type SafetensorsTensorInput } from './safetensors.js';

/** KVPACK_MODELS_DIR, else `shared/models` beside the repository root (<repo>/../shared/models). */
export const MODELS_DIR =
  process.env.KVPACK_MODELS_DIR ?? resolve(fileURLToPath(new URL('../../../../', import.meta.url)), '..', 'shared', 'models');

/** Seeded uniform PRNG (core's mulberry32). */
export const rng = mulberry32;

/**
 * Random values k / 2^bits · scale with integer |k| < 2^bits, exactly representable in float16 and
 * bfloat16 for bits ≤ 7 (so every storage dtype holds them without rounding).
 */
export function exactRandom(n: number, r: () => number, scale: number, bits = 7): Float32Array {
  const m = 2 ** bits;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (Math.floor(r() * (2 * m - 1)) - (m - 1)) / m * scale;
  return out;
}

/** Architecture of a small random test model. */
export interface TinySpec {
  arch?: 'LlamaForCausalLM' | 'Qwen2ForCausalLM' | 'MistralForCausalLM' | 'Qwen3ForCausalLM';
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  headDim?: number;
  vocabSize: number;
  tied?: boolean;
  ropeTheta?: number;
  maxSeqLen?: number;
  /** More config.json keys (sliding_window, layer_types, use_sliding_window, …). */
  extraConfig?: Record<string, unknown>;
}

/** A checkpoint: HF config.json object and tensors in PyTorch orientation ([out, in]). */
export interface TinyCheckpoint {
  config: Record<string, unknown>;
  tensors: Map<string, { shape: number[]; data: Float32Array }>;
}

/** Random weights of a Llama-family model under transformers' tensor names. */
export function tinyCheckpoint(spec: TinySpec, seed = 1): TinyCheckpoint {
  const r = rng(seed);
  const arch = spec.arch ?? 'LlamaForCausalLM';
  const d = spec.headDim ?? spec.dim / spec.nHeads;
  const D = spec.dim;
  const q = spec.nHeads * d;
  const kv = spec.nKvHeads * d;
  const F = spec.hiddenDim;
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  // Power-of-two scales near 1/sqrt(fan_in) keep activations O(1) and values exact in 16 bits.
  const mat = (name: string, out: number, inn: number) =>
    tensors.set(name, { shape: [out, inn], data: exactRandom(out * inn, r, 2 ** -Math.floor(Math.log2(Math.sqrt(inn)))) });
  const vec = (name: string, n: number, base: number, scale: number) => {
    const v = exactRandom(n, r, scale, 5); // base + k/32·scale stays within bfloat16's 8 significant bits
    for (let i = 0; i < n; i++) v[i] += base;
    tensors.set(name, { shape: [n], data: v });
  };
  tensors.set('model.embed_tokens.weight', { shape: [spec.vocabSize, D], data: exactRandom(spec.vocabSize * D, r, 1) });
  for (let l = 0; l < spec.nLayers; l++) {
    const p = `model.layers.${l}.`;
    vec(p + 'input_layernorm.weight', D, 1, 0.25);
    mat(p + 'self_attn.q_proj.weight', q, D);
    mat(p + 'self_attn.k_proj.weight', kv, D);
    mat(p + 'self_attn.v_proj.weight', kv, D);
    if (arch === 'Qwen2ForCausalLM') {
      vec(p + 'self_attn.q_proj.bias', q, 0, 0.5);
      vec(p + 'self_attn.k_proj.bias', kv, 0, 0.5);
      vec(p + 'self_attn.v_proj.bias', kv, 0, 0.5);
    }
    if (arch === 'Qwen3ForCausalLM') {
      vec(p + 'self_attn.q_norm.weight', d, 1, 0.25);
      vec(p + 'self_attn.k_norm.weight', d, 1, 0.25);
    }
    mat(p + 'self_attn.o_proj.weight', D, q);
    vec(p + 'post_attention_layernorm.weight', D, 1, 0.25);
    mat(p + 'mlp.gate_proj.weight', F, D);
    mat(p + 'mlp.up_proj.weight', F, D);
    mat(p + 'mlp.down_proj.weight', D, F);
  }
  vec('model.norm.weight', D, 1, 0.25);
  if (!spec.tied) mat('lm_head.weight', spec.vocabSize, D);
  const config: Record<string, unknown> = {
    architectures: [arch],
    model_type: { Qwen2ForCausalLM: 'qwen2', Qwen3ForCausalLM: 'qwen3', MistralForCausalLM: 'mistral', LlamaForCausalLM: 'llama' }[arch],
    hidden_size: D,
    intermediate_size: F,
    num_hidden_layers: spec.nLayers,
    num_attention_heads: spec.nHeads,
    num_key_value_heads: spec.nKvHeads,
    ...(spec.headDim ? { head_dim: spec.headDim } : {}),
    vocab_size: spec.vocabSize,
    max_position_embeddings: spec.maxSeqLen ?? 256,
    rms_norm_eps: 1e-5,
    rope_theta: spec.ropeTheta ?? 10000,
    hidden_act: 'silu',
    tie_word_embeddings: !!spec.tied,
    bos_token_id: 1,
    eos_token_id: 2,
    ...spec.extraConfig,
  };
  return { config, tensors };
}

/**
 * Writes a checkpoint as a Hugging Face directory: config.json and either model.safetensors or
 * `shards` files model-0000i-of-0000n.safetensors with model.safetensors.index.json.
 */
export function writeHfDir(dir: string, ckpt: TinyCheckpoint, opts: { shards?: number; dtype?: 'F32' | 'F16' | 'BF16' } = {}): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'config.json'), JSON.stringify(ckpt.config, null, 1));
  const all: SafetensorsTensorInput[] = [...ckpt.tensors].map(([name, t]) => ({ name, shape: t.shape, data: t.data, dtype: opts.dtype ?? 'F32' }));
  const n = opts.shards ?? 1;
  if (n === 1) {
    writeFileSync(join(dir, 'model.safetensors'), encodeSafetensors(all, { format: 'pt' }));
    return;
  }
  const per = Math.ceil(all.length / n);
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < n; s++) {
    const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
    const part = all.slice(s * per, (s + 1) * per);
    for (const t of part) weightMap[t.name] = file;
    writeFileSync(join(dir, file), encodeSafetensors(part, { format: 'pt' }));
  }
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }, null, 1));
}

/**
 * The float64 reference model (reference.testutil.ts's RefModel, PyTorch orientation) of a checkpoint,
 * read straight from its tensors and config.json, independently of the loader.
 */
export function refModelOf(ckpt: TinyCheckpoint, windows?: (number | null)[]): import('../model/reference.testutil.js').RefModel {
  const c = ckpt.config as Record<string, number & boolean>;
  const t = (name: string) => Float64Array.from(ckpt.tensors.get(name)!.data);
  const opt = (name: string) => (ckpt.tensors.has(name) ? t(name) : undefined);
  const L = c.num_hidden_layers;
  const emb = t('model.embed_tokens.weight');
  return {
    dim: c.hidden_size,
    hidden: c.intermediate_size,
    nLayers: L,
    nHeads: c.num_attention_heads,
    nKvHeads: c.num_key_value_heads,
    vocab: c.vocab_size,
    maxSeqLen: c.max_position_embeddings,
    eps: c.rms_norm_eps,
    theta: c.rope_theta,
    ropeLayout: 'half',
    ...(c.head_dim ? { headDim: c.head_dim } : {}),
    ...(windows ? { windows } : {}),
    emb,
    cls: c.tie_word_embeddings ? emb : t('lm_head.weight'),
    shared: !!c.tie_word_embeddings,
    finalNorm: t('model.norm.weight'),
    layers: Array.from({ length: L }, (_, l) => {
      const p = `model.layers.${l}.`;
      const bq = opt(p + 'self_attn.q_proj.bias');
      const qNorm = opt(p + 'self_attn.q_norm.weight');
      return {
        attnNorm: t(p + 'input_layernorm.weight'),
        wq: t(p + 'self_attn.q_proj.weight'),
        wk: t(p + 'self_attn.k_proj.weight'),
        wv: t(p + 'self_attn.v_proj.weight'),
        wo: t(p + 'self_attn.o_proj.weight'),
        ...(bq ? { bq, bk: t(p + 'self_attn.k_proj.bias'), bv: t(p + 'self_attn.v_proj.bias') } : {}),
        ...(qNorm ? { qNorm, kNorm: t(p + 'self_attn.k_norm.weight') } : {}),
        ffnNorm: t(p + 'post_attention_layernorm.weight'),
        w1: t(p + 'mlp.gate_proj.weight'),
        w2: t(p + 'mlp.down_proj.weight'),
        w3: t(p + 'mlp.up_proj.weight'),
      };
    }),
  };
}
