import { KvpackError, check, type RopeScaling } from '@kvpack/core';
import type { LlamaConfig } from '../types.js';

/** Hugging Face architectures {@link parseHfConfig} maps onto {@link LlamaConfig}. */
export const HF_ARCHITECTURES = ['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM'] as const;
const MODEL_TYPES: Record<string, (typeof HF_ARCHITECTURES)[number]> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
};

type Json = Record<string, unknown>;

function int(cfg: Json, key: string, file: string, fallback?: number): number {
  const v = cfg[key] ?? fallback;
  check(Number.isInteger(v) && (v as number) > 0, 'config', `${file}: "${key}" must be a positive integer, got ${JSON.stringify(cfg[key])}`);
  return v as number;
}

function num(cfg: Json, key: string, file: string, fallback: number): number {
  const v = cfg[key] ?? fallback;
  check(typeof v === 'number' && Number.isFinite(v) && v > 0, 'config', `${file}: "${key}" must be a positive number, got ${JSON.stringify(cfg[key])}`);
  return v;
}

function tokenId(v: unknown): number | undefined {
  if (Array.isArray(v)) return tokenId(v[0]);
  return Number.isInteger(v) ? (v as number) : undefined;
}

/**
 * Maps Hugging Face `rope_scaling` to core's {@link RopeScaling} (`modeling_rope_utils.py`):
 * `linear` (factor) and `llama3` (factor, low_freq_factor, high_freq_factor,
 * original_max_position_embeddings). `null`, absent or `default` mean none.
 * @throws KvpackError('unsupported') for other types (dynamic, yarn, longrope, …).
 */
export function parseRopeScaling(raw: unknown, file = 'config.json'): RopeScaling | null {
  if (raw === null || raw === undefined) return null;
  check(typeof raw === 'object', 'config', `${file}: "rope_scaling" must be an object or null`);
  const r = raw as Json;
  const type = (r.rope_type ?? r.type) as string | undefined;
  if (type === undefined || type === 'default') return null;
  const factor = num(r, 'factor', `${file} rope_scaling`, NaN);
  if (type === 'linear') return { type: 'linear', factor };
  if (type === 'llama3')
    return {
      type: 'llama3',
      factor,
      lowFreqFactor: num(r, 'low_freq_factor', `${file} rope_scaling`, NaN),
      highFreqFactor: num(r, 'high_freq_factor', `${file} rope_scaling`, NaN),
      originalMaxPositionEmbeddings: int(r, 'original_max_position_embeddings', `${file} rope_scaling`),
    };
  throw new KvpackError('unsupported', `${file}: rope_scaling type "${type}" is not supported (kvpack supports linear and llama3)`);
}

/**
 * Maps a Hugging Face `config.json` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) to a
 * {@link LlamaConfig}: head_dim from `head_dim` when given, else hidden_size / num_attention_heads;
 * num_key_value_heads defaults to num_attention_heads (MHA); RoPE layout `half` (transformers'
 * `rotate_half`); Qwen2 always has q/k/v biases; `tie_word_embeddings` defaults to false as in
 * these architectures' config classes. Mistral's `sliding_window` is not modelled: kvpack attends to
 * the full context, which matches Mistral for prompts shorter than the window.
 * @param file name used in messages
 * @throws KvpackError('config') for a missing or invalid field; ('unsupported') for another
 *         architecture, activation, o_proj/MLP biases or RoPE scaling type.
 */
export function parseHfConfig(cfg: Json, file = 'config.json'): LlamaConfig {
  check(cfg !== null && typeof cfg === 'object', 'config', `${file}: expected a JSON object`);
  const archs = Array.isArray(cfg.architectures) ? (cfg.architectures as string[]) : [];
  const arch =
    archs.find((a) => (HF_ARCHITECTURES as readonly string[]).includes(a)) ??
    (archs.length === 0 && typeof cfg.model_type === 'string' ? MODEL_TYPES[cfg.model_type] : undefined);
  if (!arch)
    throw new KvpackError(
      'unsupported',
      `${file}: architecture ${JSON.stringify(archs.length ? archs : cfg.model_type)} is not supported (kvpack loads ${HF_ARCHITECTURES.join(', ')})`,
    );
  const act = cfg.hidden_act ?? cfg.hidden_activation ?? 'silu';
  check(act === 'silu', 'unsupported', `${file}: hidden_act "${String(act)}" is not supported (Llama-family SwiGLU uses silu)`);
  check(!cfg.mlp_bias, 'unsupported', `${file}: mlp_bias = true is not supported`);
  const isQwen2 = arch === 'Qwen2ForCausalLM';
  check(isQwen2 || !cfg.attention_bias, 'unsupported', `${file}: attention_bias = true (biases on q/k/v and o_proj) is not supported for ${arch}`);

  const dim = int(cfg, 'hidden_size', file);
  const nHeads = int(cfg, 'num_attention_heads', file);
  const nKvHeads = int(cfg, 'num_key_value_heads', file, nHeads);
  check(nHeads % nKvHeads === 0, 'config', `${file}: num_attention_heads ${nHeads} is not a multiple of num_key_value_heads ${nKvHeads}`);
  const headDim = cfg.head_dim == null ? dim / nHeads : int(cfg, 'head_dim', file);
  check(Number.isInteger(headDim) && headDim % 2 === 0, 'config', `${file}: head_dim ${headDim} (hidden_size / num_attention_heads) must be an even integer`);
  return {
    nLayers: int(cfg, 'num_hidden_layers', file),
    nHeads,
    nKvHeads,
    headDim,
    dim,
    hiddenDim: int(cfg, 'intermediate_size', file),
    vocabSize: int(cfg, 'vocab_size', file),
    maxSeqLen: int(cfg, 'max_position_embeddings', file, 2048),
    normEps: num(cfg, 'rms_norm_eps', file, 1e-6),
    rope: { theta: num(cfg, 'rope_theta', file, 10000), layout: 'half', scaling: parseRopeScaling(cfg.rope_scaling, file) },
    tiedEmbeddings: cfg.tie_word_embeddings === true,
    qkvBias: isQwen2,
    bosId: tokenId(cfg.bos_token_id),
    eosId: tokenId(cfg.eos_token_id),
  };
}
