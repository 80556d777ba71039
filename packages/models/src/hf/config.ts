import { KvpackError, check, type RopeScaling } from '@kvpack/core';
import type { LlamaConfig } from '../types.js';
import { positiveNumber as num, tokenId, unknownConfigKeys, warnUnknownKeys, type HfUnknownKey, type Json } from '../config-json.js';

/** Hugging Face architectures {@link parseHfConfig} maps onto {@link LlamaConfig}. */
export const HF_ARCHITECTURES = ['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'] as const;
const MODEL_TYPES: Record<string, (typeof HF_ARCHITECTURES)[number]> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
};

/** Every Hugging Face `model_type` kvpack loads: Llama-family ones (LlamaModel) and DeepSeek MLA ones (DeepseekModel). */
export const HF_MODEL_TYPES = ['llama', 'mistral', 'qwen2', 'qwen3', 'deepseek_v2', 'deepseek_v3'] as const;


function int(cfg: Json, key: string, file: string, fallback?: number, max = Number.MAX_SAFE_INTEGER): number {
  const v = cfg[key] ?? fallback;
  check(Number.isInteger(v) && (v as number) > 0, 'config', `${file}: "${key}" must be a positive integer, got ${JSON.stringify(cfg[key])}`);
  check((v as number) <= max, 'config', `${file}: "${key}" = ${JSON.stringify(cfg[key])} is above the sane bound ${max} (corrupt or hostile config)`);
  return v as number;
}

/**
 * Upper bounds on config.json dimensions, far above any published Llama-family model, so that a
 * corrupt value (a flipped bit, `1e9`) is refused before anything is sized by it.
 */
export const HF_CONFIG_LIMITS = {
  hidden_size: 1 << 17,
  intermediate_size: 1 << 20,
  num_hidden_layers: 2048,
  num_attention_heads: 1024,
  num_key_value_heads: 1024,
  head_dim: 1024,
  vocab_size: 1 << 24,
  max_position_embeddings: 1 << 27,
} as const;

/** config.json keys {@link parseHfConfig} reads. */
export const HF_CONFIG_KEYS_READ = [
  'architectures',
  'model_type',
  'hidden_act',
  'hidden_activation',
  'mlp_bias',
  'attention_bias',
  'hidden_size',
  'num_attention_heads',
  'num_key_value_heads',
  'head_dim',
  'num_hidden_layers',
  'intermediate_size',
  'vocab_size',
  'max_position_embeddings',
  'rms_norm_eps',
  'rope_theta',
  'rope_scaling',
  'tie_word_embeddings',
  'bos_token_id',
  'eos_token_id',
  'sliding_window',
  'use_sliding_window',
  'max_window_layers',
  'layer_types',
] as const;

/**
 * Standard Hugging Face config keys that do not affect kvpack's forward pass (PretrainedConfig's
 * bookkeeping, generation defaults, training-only settings): accepted without a warning.
 */
export const HF_CONFIG_KEYS_IGNORED = [
  '_name_or_path',
  'name_or_path',
  '_attn_implementation',
  '_attn_implementation_autoset',
  'transformers_version',
  'torch_dtype',
  'dtype',
  'pad_token_id',
  'sep_token_id',
  'decoder_start_token_id',
  'initializer_range',
  'use_cache',
  'pretraining_tp',
  'attention_dropout',
  'hidden_dropout',
  'embd_pdrop',
  'resid_pdrop',
  'output_attentions',
  'output_hidden_states',
  'output_scores',
  'return_dict',
  'return_dict_in_generate',
  'torchscript',
  'use_bfloat16',
  'tf_legacy_loss',
  'is_encoder_decoder',
  'is_decoder',
  'add_cross_attention',
  'tie_encoder_decoder',
  'cross_attention_hidden_size',
  'chunk_size_feed_forward',
  'pruned_heads',
  'problem_type',
  'id2label',
  'label2id',
  'num_labels',
  'finetuning_task',
  'tokenizer_class',
  'prefix',
  'task_specific_params',
  'max_length',
  'min_length',
  'do_sample',
  'early_stopping',
  'num_beams',
  'num_beam_groups',
  'diversity_penalty',
  'temperature',
  'top_k',
  'top_p',
  'typical_p',
  'repetition_penalty',
  'length_penalty',
  'no_repeat_ngram_size',
  'encoder_no_repeat_ngram_size',
  'bad_words_ids',
  'num_return_sequences',
  'forced_bos_token_id',
  'forced_eos_token_id',
  'remove_invalid_values',
  'exponential_decay_length_penalty',
  'suppress_tokens',
  'begin_suppress_tokens',
] as const;

const READ = new Set<string>(HF_CONFIG_KEYS_READ);
const IGNORED = new Set<string>(HF_CONFIG_KEYS_IGNORED);

export type { HfUnknownKey } from '../config-json.js';

/**
 * The keys of a config.json object that are neither read by {@link parseHfConfig} nor on the
 * allow-list of irrelevant standard keys ({@link HF_CONFIG_KEYS_IGNORED}), each with the read key it
 * most likely misspells. A misspelt key (`num_hiden_layers`) means its real counterpart falls back
 * to a default or is reported missing.
 */
export function unknownHfConfigKeys(cfg: Json): HfUnknownKey[] {
  return unknownConfigKeys(cfg, READ, IGNORED);
}

/** Options of {@link parseHfConfig}. */
export interface HfConfigOptions {
  /**
   * Called once when config.json has keys the loader does not understand (see
   * {@link unknownHfConfigKeys}), with a message listing them and the keys themselves.
   * Default: `console.warn(message)`.
   */
  onWarning?: (message: string, unknownKeys: HfUnknownKey[]) => void;
}


/**
 * Maps Hugging Face `rope_scaling` to core's {@link RopeScaling} (`modeling_rope_utils.py`):
 * `linear` (factor) and `llama3` (factor, low_freq_factor, high_freq_factor,
 * original_max_position_embeddings); with `options.yarn` (the DeepSeek MLA models) also `yarn` (factor,
 * original_max_position_embeddings, beta_fast 32, beta_slow 1, mscale, mscale_all_dim). `null`, absent or
 * `default` mean none.
 * @throws KvpackError('unsupported') for other types (dynamic, longrope, …, and yarn without `options.yarn`);
 *   ('config') for a missing or invalid field.
 */
export function parseRopeScaling(raw: unknown, file = 'config.json', options: { yarn?: boolean } = {}): RopeScaling | null {
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
  if (type === 'yarn' && options.yarn) {
    const where = `${file} rope_scaling`;
    const ms = (k: string) => {
      const v = r[k];
      check(v === undefined || v === null || (typeof v === 'number' && Number.isFinite(v) && v >= 0), 'config', `${where}: "${k}" must be a number ≥ 0, got ${JSON.stringify(v)}`);
      return typeof v === 'number' ? v : 0;
    };
    const mscale = ms('mscale');
    const mscaleAllDim = ms('mscale_all_dim');
    check(r.attention_factor === undefined || r.attention_factor === null, 'unsupported', `${where}: an explicit yarn "attention_factor" is not supported (kvpack derives it from mscale and mscale_all_dim)`);
    check(r.truncate === undefined || r.truncate === true, 'unsupported', `${where}: yarn "truncate": ${JSON.stringify(r.truncate)} is not supported (kvpack rounds the ramp's ends as DeepSeek does)`);
    check(r.original_max_position_embeddings !== undefined && r.original_max_position_embeddings !== null, 'config', `${where}: yarn lacks "original_max_position_embeddings"`);
    return {
      type: 'yarn',
      factor,
      originalMaxPositionEmbeddings: int(r, 'original_max_position_embeddings', where),
      betaFast: num(r, 'beta_fast', where, 32),
      betaSlow: num(r, 'beta_slow', where, 1),
      // cos/sin magnitude m(s, mscale) / m(s, mscale_all_dim) when both are set, else m(s, 1) (transformers' rule).
      ...(mscale && mscaleAllDim ? { mscale, mscaleAllDim } : { mscale: 1, mscaleAllDim: 0 }),
    };
  }
  throw new KvpackError(
    'unsupported',
    `${file}: rope_scaling type "${type}" is not supported (kvpack supports linear and llama3${type === 'yarn' ? '; yarn for deepseek_v2 and deepseek_v3' : ''})`,
  );
}

/**
 * Sliding windows per layer from config.json, as transformers reads them: `layer_types`
 * ("sliding_attention" / "full_attention") with `sliding_window` when given; else Qwen2/Qwen3's
 * `use_sliding_window` (default false) windowing layers ≥ `max_window_layers`; else Mistral's
 * `sliding_window` on every layer. Undefined when no layer is windowed.
 * @throws KvpackError('config') for a window that is not a positive integer, layer_types of the wrong
 *   length or with an unknown entry, or windowed layers without `sliding_window`.
 */
export function parseSlidingWindows(cfg: Json, arch: string, nLayers: number, file: string): (number | null)[] | undefined {
  const sw = cfg.sliding_window;
  check(sw == null || (Number.isInteger(sw) && (sw as number) > 0), 'config', `${file}: "sliding_window" must be a positive integer (tokens) or null, got ${JSON.stringify(sw)}`);
  const W = sw == null ? null : (sw as number);
  let windowed: boolean[];
  if (cfg.layer_types != null) {
    const lt = cfg.layer_types;
    check(Array.isArray(lt) && lt.length === nLayers, 'config', `${file}: "layer_types" must list one entry per layer (${nLayers}), got ${JSON.stringify(lt)}`);
    windowed = (lt as unknown[]).map((t, l) => {
      check(t === 'sliding_attention' || t === 'full_attention', 'config', `${file}: layer_types[${l}] = ${JSON.stringify(t)} is not "sliding_attention" or "full_attention"`);
      return t === 'sliding_attention';
    });
  } else if (arch === 'Qwen2ForCausalLM' || arch === 'Qwen3ForCausalLM') {
    const use = cfg.use_sliding_window === true;
    const mw = cfg.max_window_layers;
    check(mw == null || (Number.isInteger(mw) && (mw as number) >= 0), 'config', `${file}: "max_window_layers" must be an integer ≥ 0, got ${JSON.stringify(mw)}`);
    const from = mw == null ? nLayers : (mw as number);
    windowed = Array.from({ length: nLayers }, (_, l) => use && W !== null && l >= from);
  } else if (arch === 'MistralForCausalLM') {
    windowed = Array.from({ length: nLayers }, () => W !== null);
  } else {
    windowed = Array.from({ length: nLayers }, () => false);
  }
  if (!windowed.some(Boolean)) return undefined;
  check(W !== null, 'config', `${file}: layers are marked sliding_attention but "sliding_window" is not set`);
  return windowed.map((w) => (w ? W : null));
}

/**
 * Maps a Hugging Face `config.json` (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM) to a
 * {@link LlamaConfig}: head_dim from `head_dim` when given, else hidden_size / num_attention_heads;
 * num_key_value_heads defaults to num_attention_heads (MHA); RoPE layout `half` (transformers'
 * `rotate_half`); Qwen2 always has q/k/v biases, Qwen3 has them only with `attention_bias` and
 * normalizes each head's queries and keys (q_norm, k_norm) before RoPE; `tie_word_embeddings`
 * defaults to false as in these architectures' config classes. Sliding-window layers follow
 * {@link parseSlidingWindows}.
 *
 * Dimensions must be positive integers within {@link HF_CONFIG_LIMITS}. Keys neither read nor on the
 * allow-list {@link HF_CONFIG_KEYS_IGNORED} (typically misspellings, e.g. `num_hiden_layers`) are
 * reported through `options.onWarning` (default `console.warn`), not refused.
 * @param file name used in messages
 * @throws KvpackError('config') for a missing or invalid field, or one above its bound;
 *         ('unsupported') for another architecture, activation, o_proj/MLP biases or RoPE scaling type.
 */
export function parseHfConfig(cfg: Json, file = 'config.json', options: HfConfigOptions = {}): LlamaConfig {
  check(cfg !== null && typeof cfg === 'object' && !Array.isArray(cfg), 'config', `${file}: expected a JSON object`);
  const archs = Array.isArray(cfg.architectures) ? (cfg.architectures as unknown[]) : [];
  const arch =
    archs.find((a): a is (typeof HF_ARCHITECTURES)[number] => (HF_ARCHITECTURES as readonly unknown[]).includes(a)) ??
    (archs.length === 0 && typeof cfg.model_type === 'string' && Object.hasOwn(MODEL_TYPES, cfg.model_type) ? MODEL_TYPES[cfg.model_type] : undefined);
  if (!arch) {
    if (cfg.model_type === 'deepseek_v2' || cfg.model_type === 'deepseek_v3')
      throw new KvpackError('unsupported', `${file}: model_type "${cfg.model_type}" is a Multi-head Latent Attention model: load it with loadDeepseekModel (DeepseekModel), not as a Llama-family model`);
    throw new KvpackError(
      'unsupported',
      `${file}: architecture ${JSON.stringify(archs.length ? archs : cfg.model_type)} is not supported (kvpack loads ${HF_ARCHITECTURES.join(', ')}; model_type ${HF_MODEL_TYPES.join(', ')})`,
    );
  }
  const act = cfg.hidden_act ?? cfg.hidden_activation ?? 'silu';
  check(act === 'silu', 'unsupported', `${file}: hidden_act ${JSON.stringify(act)} is not supported (Llama-family SwiGLU uses silu)`);
  check(!cfg.mlp_bias, 'unsupported', `${file}: mlp_bias = true is not supported`);
  const isQwen2 = arch === 'Qwen2ForCausalLM';
  const isQwen3 = arch === 'Qwen3ForCausalLM';
  check(isQwen2 || !cfg.attention_bias, 'unsupported', `${file}: attention_bias = true (biases on q/k/v and o_proj) is not supported for ${arch}`);

  const L = HF_CONFIG_LIMITS;
  const dim = int(cfg, 'hidden_size', file, undefined, L.hidden_size);
  const nHeads = int(cfg, 'num_attention_heads', file, undefined, L.num_attention_heads);
  const nKvHeads = int(cfg, 'num_key_value_heads', file, nHeads, L.num_key_value_heads);
  check(nHeads % nKvHeads === 0, 'config', `${file}: num_attention_heads ${nHeads} is not a multiple of num_key_value_heads ${nKvHeads}`);
  const headDim = cfg.head_dim == null ? dim / nHeads : int(cfg, 'head_dim', file, undefined, L.head_dim);
  check(Number.isInteger(headDim) && headDim % 2 === 0, 'config', `${file}: head_dim ${headDim} (hidden_size / num_attention_heads) must be an even integer`);
  const nLayers = int(cfg, 'num_hidden_layers', file, undefined, L.num_hidden_layers);
  const windows = parseSlidingWindows(cfg, arch, nLayers, file);
  const config: LlamaConfig = {
    nLayers,
    nHeads,
    nKvHeads,
    headDim,
    dim,
    hiddenDim: int(cfg, 'intermediate_size', file, undefined, L.intermediate_size),
    vocabSize: int(cfg, 'vocab_size', file, undefined, L.vocab_size),
    maxSeqLen: int(cfg, 'max_position_embeddings', file, 2048, L.max_position_embeddings),
    normEps: num(cfg, 'rms_norm_eps', file, 1e-6),
    rope: { theta: num(cfg, 'rope_theta', file, 10000), layout: 'half', scaling: parseRopeScaling(cfg.rope_scaling, file) },
    tiedEmbeddings: cfg.tie_word_embeddings === true,
    qkvBias: isQwen2,
    ...(isQwen3 ? { qkNorm: true } : {}),
    ...(windows ? { windows } : {}),
    bosId: tokenId(cfg.bos_token_id),
    eosId: tokenId(cfg.eos_token_id),
  };
  warnUnknownKeys(unknownHfConfigKeys(cfg), file, options.onWarning);
  return config;
}
