import { KvpackError, check, type RopeConfig } from '@kvpack/core';
import { HF_MODEL_TYPES, parseRopeScaling, type HfConfigOptions } from '../hf/config.js';
import { positiveNumber as posNum, tokenId, unknownConfigKeys, warnUnknownKeys, type Json } from '../config-json.js';

/** Hugging Face `model_type`s of Multi-head Latent Attention models {@link parseDeepseekConfig} reads. */
export const DEEPSEEK_MODEL_TYPES = ['deepseek_v2', 'deepseek_v3'] as const;
export type DeepseekModelType = (typeof DEEPSEEK_MODEL_TYPES)[number];

/** How routed experts are picked (DeepSeek `topk_method`). */
export type TopkMethod = 'greedy' | 'group_limited_greedy' | 'noaux_tc';

/**
 * The mixture-of-experts feed-forward of a DeepSeek model (DeepSeek-V2 paper §2.2, DeepSeek-V3 §2.1.2):
 * `nSharedExperts` always-on experts plus the top-`topK` of `nRoutedExperts` routed experts per token.
 */
export interface MoeConfig {
  /** Routed experts E. */
  nRoutedExperts: number;
  /** Shared experts (one SwiGLU of width moeHiddenDim × nSharedExperts); 0 for none. */
  nSharedExperts: number;
  /** SwiGLU width of one expert (`moe_intermediate_size`). */
  moeHiddenDim: number;
  /** Routed experts per token k (`num_experts_per_tok`). */
  topK: number;
  /** Router scores: softmax over experts (V2) or per-expert sigmoid (V3). */
  scoring: 'softmax' | 'sigmoid';
  /** greedy top-k; group_limited_greedy (groups ranked by their best score); noaux_tc (groups ranked by the sum of their two best bias-corrected scores, V3). */
  topkMethod: TopkMethod;
  /** Expert groups (`n_group`), for the group-limited methods; 1 otherwise. */
  nGroup: number;
  /** Groups a token may route to (`topk_group`). */
  topkGroup: number;
  /** Routed weights are multiplied by it. */
  routedScalingFactor: number;
  /** Normalize the k routed weights to sum 1 (V2: instead of scaling them; V3: before scaling). */
  normTopkProb: boolean;
  /** Layers before this one are dense (`first_k_dense_replace`). */
  firstKDense: number;
  /** Every `layerFreq`-th layer from firstKDense on is MoE (`moe_layer_freq`, default 1). */
  layerFreq: number;
}

/**
 * Architecture of a DeepSeek-V2 / V2-Lite / V3 decoder with Multi-head Latent Attention (DeepSeek-V2
 * paper §2.1): per layer the cache holds the latent c_KV [T, kvLoraRank] (after its RMSNorm) and one
 * RoPE key k_R [T, qkRopeHeadDim] shared by all heads. D = dim, H = nHeads, r = kvLoraRank,
 * d_n = qkNopeHeadDim, d_r = qkRopeHeadDim, d_v = vHeadDim.
 */
export interface DeepseekConfig {
  modelType: DeepseekModelType;
  nLayers: number;
  /** Model width D. */
  dim: number;
  /** Query heads H. */
  nHeads: number;
  vocabSize: number;
  /** Longest context, tokens. */
  maxSeqLen: number;
  normEps: number;
  /** Rank of the query down-projection (`q_lora_rank`); null when queries are projected directly (V2-Lite). */
  qLoraRank: number | null;
  /** Latent width r (`kv_lora_rank`). */
  kvLoraRank: number;
  /** Per-head query/key channels without RoPE, d_n. */
  qkNopeHeadDim: number;
  /** RoPE channels of queries and of the shared key, d_r. */
  qkRopeHeadDim: number;
  /** Per-head value channels d_v. */
  vHeadDim: number;
  /** RoPE of the d_r channels: `interleaved` pairs (DeepSeek's complex rotation; V3 with `rope_interleave` false: `half`), with YaRN scaling when configured. */
  rope: RopeConfig;
  /** Softmax scale of attention scores: (d_n + d_r)^−½, times mscale(s, mscale_all_dim)² under YaRN. */
  softmaxScale: number;
  /** Dense SwiGLU width (`intermediate_size`). */
  hiddenDim: number;
  /** Mixture of experts; null when every layer is dense. */
  moe: MoeConfig | null;
  tiedEmbeddings: boolean;
  bosId?: number;
  eosId?: number;
}

/** YaRN's magnitude rule m(s, k) = 0.1 · k · ln(s) + 1 for s > 1, else 1 (DeepSeek `yarn_get_mscale`). */
export function yarnMscale(factor: number, k: number): number {
  return factor <= 1 ? 1 : 0.1 * k * Math.log(factor) + 1;
}

/** True when layer `l` has the MoE feed-forward (l ≥ first_k_dense_replace and l % moe_layer_freq = 0). */
export function isMoeLayer(c: DeepseekConfig, l: number): boolean {
  return c.moe !== null && l >= c.moe.firstKDense && l % c.moe.layerFreq === 0;
}

/** Upper bounds on DeepSeek config.json dimensions (far above published models), so a corrupt value is refused before anything is sized by it. */
export const DEEPSEEK_CONFIG_LIMITS = {
  hidden_size: 1 << 17,
  intermediate_size: 1 << 20,
  moe_intermediate_size: 1 << 20,
  num_hidden_layers: 2048,
  num_attention_heads: 1024,
  vocab_size: 1 << 24,
  max_position_embeddings: 1 << 27,
  q_lora_rank: 1 << 16,
  kv_lora_rank: 1 << 16,
  qk_nope_head_dim: 4096,
  qk_rope_head_dim: 4096,
  v_head_dim: 4096,
  n_routed_experts: 1 << 14,
  n_shared_experts: 1024,
} as const;

/** config.json keys {@link parseDeepseekConfig} reads. */
export const DEEPSEEK_CONFIG_KEYS_READ = [
  'architectures',
  'model_type',
  'hidden_act',
  'attention_bias',
  'mlp_bias',
  'hidden_size',
  'intermediate_size',
  'moe_intermediate_size',
  'num_hidden_layers',
  'num_attention_heads',
  'num_key_value_heads',
  'vocab_size',
  'max_position_embeddings',
  'rms_norm_eps',
  'rope_theta',
  'rope_scaling',
  'rope_parameters',
  'rope_interleave',
  'q_lora_rank',
  'kv_lora_rank',
  'qk_nope_head_dim',
  'qk_rope_head_dim',
  'v_head_dim',
  'head_dim',
  'n_routed_experts',
  'n_shared_experts',
  'num_experts_per_tok',
  'scoring_func',
  'topk_method',
  'n_group',
  'topk_group',
  'routed_scaling_factor',
  'norm_topk_prob',
  'first_k_dense_replace',
  'moe_layer_freq',
  'num_nextn_predict_layers',
  'tie_word_embeddings',
  'bos_token_id',
  'eos_token_id',
] as const;

/** DeepSeek config.json keys that do not affect inference (training losses, parallelism, bookkeeping). */
export const DEEPSEEK_CONFIG_KEYS_IGNORED = [
  '_name_or_path',
  'auto_map',
  'transformers_version',
  'torch_dtype',
  'dtype',
  'pad_token_id',
  'initializer_range',
  'use_cache',
  'pretraining_tp',
  'attention_dropout',
  'aux_loss_alpha',
  'seq_aux',
  'ep_size',
  'output_router_logits',
  'router_aux_loss_coef',
  'quantization_config',
  'num_experts',
] as const;

const READ = new Set<string>(DEEPSEEK_CONFIG_KEYS_READ);
const IGNORED = new Set<string>(DEEPSEEK_CONFIG_KEYS_IGNORED);


/** A required positive integer: missing → named as missing. */
function req(cfg: Json, key: string, file: string, max: number): number {
  check(cfg[key] !== undefined && cfg[key] !== null, 'config', `${file}: DeepSeek config lacks "${key}"`);
  return posInt(cfg[key], key, file, max);
}

function posInt(v: unknown, key: string, file: string, max: number, min = 1): number {
  check(Number.isInteger(v) && (v as number) >= min, 'config', `${file}: "${key}" must be an integer ≥ ${min}, got ${JSON.stringify(v)}`);
  check((v as number) <= max, 'config', `${file}: "${key}" = ${JSON.stringify(v)} is above the sane bound ${max} (corrupt or hostile config)`);
  return v as number;
}

function optInt(cfg: Json, key: string, file: string, fallback: number, max: number, min = 1): number {
  const v = cfg[key];
  return v === undefined || v === null ? fallback : posInt(v, key, file, max, min);
}


/**
 * Maps a Hugging Face DeepSeek-V2 / V2-Lite / V3 `config.json` (model_type `deepseek_v2`,
 * `deepseek_v3`; the fields of transformers' `DeepseekV2Config` / `DeepseekV3Config` and DeepSeek's own
 * configs) to a {@link DeepseekConfig}.
 *
 * The attention fields (hidden_size, num_hidden_layers, num_attention_heads, vocab_size,
 * kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, intermediate_size) are required;
 * `q_lora_rank` null or absent means queries are projected directly (V2-Lite). With
 * `n_routed_experts` set, moe_intermediate_size and num_experts_per_tok are required too, and
 * n_group / topk_group for the group-limited methods. Defaults follow the model type: V2 softmax
 * scores, `greedy`, norm_topk_prob false; V3 sigmoid, `noaux_tc`, norm_topk_prob true.
 * RoPE (theta, `rope_scaling` or transformers 5's `rope_parameters`, including `yarn` with mscale)
 * acts on the d_r channels, interleaved as DeepSeek's complex rotation (V3 with `rope_interleave`
 * false: half). Under YaRN the softmax scale is (d_n + d_r)^−½ · mscale(factor, mscale_all_dim)².
 *
 * @param file name used in messages
 * @throws KvpackError('config') naming a missing or invalid field; ('unsupported') for another
 *   model_type (listing the supported ones), an activation other than silu, biases, an unknown
 *   scoring function or top-k method, or GQA-style num_key_value_heads.
 */
export function parseDeepseekConfig(cfg: Json, file = 'config.json', options: HfConfigOptions = {}): DeepseekConfig {
  check(cfg !== null && typeof cfg === 'object' && !Array.isArray(cfg), 'config', `${file}: expected a JSON object`);
  const mt = cfg.model_type;
  if (!(DEEPSEEK_MODEL_TYPES as readonly unknown[]).includes(mt))
    throw new KvpackError(
      'unsupported',
      `${file}: model_type ${JSON.stringify(mt)} is not supported (kvpack loads model_type ${HF_MODEL_TYPES.join(', ')}: ${DEEPSEEK_MODEL_TYPES.join(' and ')} with loadDeepseekModel, the others with loadHfModel)`,
    );
  const modelType = mt as DeepseekModelType;
  const v3 = modelType === 'deepseek_v3';
  const act = cfg.hidden_act ?? 'silu';
  check(act === 'silu', 'unsupported', `${file}: hidden_act ${JSON.stringify(act)} is not supported (DeepSeek's SwiGLU uses silu)`);
  check(!cfg.attention_bias, 'unsupported', `${file}: attention_bias = true is not supported`);
  check(!cfg.mlp_bias, 'unsupported', `${file}: mlp_bias = true is not supported`);

  const L = DEEPSEEK_CONFIG_LIMITS;
  const dim = req(cfg, 'hidden_size', file, L.hidden_size);
  const nLayers = req(cfg, 'num_hidden_layers', file, L.num_hidden_layers);
  const nHeads = req(cfg, 'num_attention_heads', file, L.num_attention_heads);
  const kvh = cfg.num_key_value_heads;
  check(
    kvh === undefined || kvh === null || kvh === nHeads,
    'unsupported',
    `${file}: num_key_value_heads ${JSON.stringify(kvh)} differs from num_attention_heads ${nHeads}; MLA gives every query head its own keys from the latent`,
  );
  const vocabSize = req(cfg, 'vocab_size', file, L.vocab_size);
  const hiddenDim = req(cfg, 'intermediate_size', file, L.intermediate_size);
  const kvLoraRank = req(cfg, 'kv_lora_rank', file, L.kv_lora_rank);
  const qkNopeHeadDim = req(cfg, 'qk_nope_head_dim', file, L.qk_nope_head_dim);
  const qkRopeHeadDim = req(cfg, 'qk_rope_head_dim', file, L.qk_rope_head_dim);
  check(qkRopeHeadDim % 2 === 0, 'config', `${file}: "qk_rope_head_dim" must be even for RoPE, got ${qkRopeHeadDim}`);
  const vHeadDim = req(cfg, 'v_head_dim', file, L.v_head_dim);
  const qLoraRank = cfg.q_lora_rank === undefined || cfg.q_lora_rank === null ? null : posInt(cfg.q_lora_rank, 'q_lora_rank', file, L.q_lora_rank);
  const maxSeqLen = optInt(cfg, 'max_position_embeddings', file, 2048, L.max_position_embeddings);
  const normEps = posNum(cfg, 'rms_norm_eps', file, 1e-6);

  // transformers 5 writes rope_parameters {rope_theta, rope_type, …}; earlier configs rope_theta + rope_scaling.
  const rp = cfg.rope_parameters;
  check(rp === undefined || rp === null || (typeof rp === 'object' && !Array.isArray(rp)), 'config', `${file}: "rope_parameters" must be an object`);
  const rpo = (rp ?? {}) as Json;
  const theta = posNum(rpo.rope_theta !== undefined ? rpo : cfg, 'rope_theta', file, 10000);
  const scalingRaw = cfg.rope_scaling ?? (rp && (rpo.rope_type ?? rpo.type) !== undefined ? rpo : null);
  const scaling = parseRopeScaling(scalingRaw, file, { yarn: true });
  check(cfg.rope_interleave === undefined || typeof cfg.rope_interleave === 'boolean', 'config', `${file}: "rope_interleave" must be a boolean`);
  const layout = v3 && cfg.rope_interleave === false ? 'half' : 'interleaved';
  let softmaxScale = 1 / Math.sqrt(qkNopeHeadDim + qkRopeHeadDim);
  const allDim = scaling?.type === 'yarn' ? (scalingRaw as Json).mscale_all_dim : undefined;
  if (scaling?.type === 'yarn' && typeof allDim === 'number' && allDim > 0) softmaxScale *= yarnMscale(scaling.factor, allDim) ** 2;

  let moe: MoeConfig | null = null;
  if (cfg.n_routed_experts !== undefined && cfg.n_routed_experts !== null) {
    const nRoutedExperts = posInt(cfg.n_routed_experts, 'n_routed_experts', file, L.n_routed_experts);
    const need = (k: string, max: number) => req(cfg, k, file, max);
    const topK = need('num_experts_per_tok', nRoutedExperts);
    const scoringRaw = cfg.scoring_func ?? (v3 ? 'sigmoid' : 'softmax');
    check(scoringRaw === 'softmax' || scoringRaw === 'sigmoid', 'unsupported', `${file}: scoring_func ${JSON.stringify(scoringRaw)} is not supported (softmax, sigmoid)`);
    const methodRaw = cfg.topk_method ?? (v3 ? 'noaux_tc' : 'greedy');
    check(
      methodRaw === 'greedy' || methodRaw === 'group_limited_greedy' || methodRaw === 'noaux_tc',
      'unsupported',
      `${file}: topk_method ${JSON.stringify(methodRaw)} is not supported (greedy, group_limited_greedy, noaux_tc)`,
    );
    const grouped = methodRaw !== 'greedy';
    const nGroup = grouped ? need('n_group', nRoutedExperts) : optInt(cfg, 'n_group', file, 1, nRoutedExperts);
    const topkGroup = grouped ? need('topk_group', nGroup) : optInt(cfg, 'topk_group', file, 1, nRoutedExperts);
    if (grouped) {
      check(nRoutedExperts % nGroup === 0, 'config', `${file}: n_routed_experts ${nRoutedExperts} is not a multiple of n_group ${nGroup}`);
      check(topK <= topkGroup * (nRoutedExperts / nGroup), 'config', `${file}: num_experts_per_tok ${topK} exceeds the ${topkGroup * (nRoutedExperts / nGroup)} experts of topk_group ${topkGroup} groups`);
      if (methodRaw === 'noaux_tc') check(nRoutedExperts / nGroup >= 2, 'config', `${file}: noaux_tc ranks groups by their two best experts; n_group ${nGroup} leaves fewer than 2 per group`);
    }
    const norm = cfg.norm_topk_prob ?? v3;
    check(typeof norm === 'boolean', 'config', `${file}: "norm_topk_prob" must be a boolean, got ${JSON.stringify(cfg.norm_topk_prob)}`);
    moe = {
      nRoutedExperts,
      nSharedExperts: optInt(cfg, 'n_shared_experts', file, 0, L.n_shared_experts, 0),
      moeHiddenDim: need('moe_intermediate_size', L.moe_intermediate_size),
      topK,
      scoring: scoringRaw,
      topkMethod: methodRaw,
      nGroup,
      topkGroup,
      routedScalingFactor: posNum(cfg, 'routed_scaling_factor', file, 1),
      normTopkProb: norm,
      firstKDense: optInt(cfg, 'first_k_dense_replace', file, 0, nLayers, 0),
      layerFreq: optInt(cfg, 'moe_layer_freq', file, 1, nLayers),
    };
  }

  const config: DeepseekConfig = {
    modelType,
    nLayers,
    dim,
    nHeads,
    vocabSize,
    maxSeqLen,
    normEps,
    qLoraRank,
    kvLoraRank,
    qkNopeHeadDim,
    qkRopeHeadDim,
    vHeadDim,
    rope: { theta, layout, scaling },
    softmaxScale,
    hiddenDim,
    moe,
    tiedEmbeddings: cfg.tie_word_embeddings === true,
    bosId: tokenId(cfg.bos_token_id),
    eosId: tokenId(cfg.eos_token_id),
  };
  warnUnknownKeys(unknownConfigKeys(cfg, READ, IGNORED), file, options.onWarning);
  return config;
}
