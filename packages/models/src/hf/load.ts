import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { KvpackError, check } from '@kvpack/core';
import type { LlamaConfig, LlamaWeights } from '../types.js';
import { parseHfConfig } from './config.js';
import { SafetensorsFile } from './safetensors.js';
import { HfTokenizer, readHfJson } from './tokenizer.js';
import { LlamaWeightsBuilder, type LayerField, type WeightSlot } from './weights.js';

const LAYER_NAMES: Record<LayerField, string> = {
  attnNorm: 'input_layernorm.weight',
  wq: 'self_attn.q_proj.weight',
  wk: 'self_attn.k_proj.weight',
  wv: 'self_attn.v_proj.weight',
  wo: 'self_attn.o_proj.weight',
  bq: 'self_attn.q_proj.bias',
  bk: 'self_attn.k_proj.bias',
  bv: 'self_attn.v_proj.bias',
  ffnNorm: 'post_attention_layernorm.weight',
  w1: 'mlp.gate_proj.weight',
  w2: 'mlp.down_proj.weight',
  w3: 'mlp.up_proj.weight',
};
const FIELD_OF = new Map(Object.entries(LAYER_NAMES).map(([f, n]) => [n, f as LayerField]));

/** The transformers tensor name of a weight slot (`model.layers.3.self_attn.q_proj.weight`, …). */
export function hfTensorName(s: WeightSlot): string {
  if (s === 'embedding') return 'model.embed_tokens.weight';
  if (s === 'finalNorm') return 'model.norm.weight';
  if (s === 'classifier') return 'lm_head.weight';
  return `model.layers.${s.layer}.${LAYER_NAMES[s.field]}`;
}

/** The weight slot of a transformers tensor name (with or without the `model.` prefix), or null. */
export function hfSlotOf(name: string): WeightSlot | null {
  const n = name.startsWith('model.') ? name.slice(6) : name;
  if (n === 'embed_tokens.weight') return 'embedding';
  if (n === 'norm.weight') return 'finalNorm';
  if (name === 'lm_head.weight') return 'classifier';
  const m = /^layers\.(\d+)\.(.+)$/.exec(n);
  if (!m) return null;
  const field = FIELD_OF.get(m[2]);
  return field ? { layer: Number(m[1]), field } : null;
}

/** Where a checkpoint's tensors live: shard files (in load order) and, when sharded, the index. */
export interface HfShards {
  files: string[];
  /** Tensor name → shard file name, from model.safetensors.index.json (absent for one file). */
  weightMap?: Map<string, string>;
}

/**
 * Finds the safetensors files of a Hugging Face model directory: `model.safetensors.index.json`
 * (every shard it names must exist) or a single `model.safetensors`.
 * @throws KvpackError('io') naming a missing shard, or when the directory holds no weights.
 */
export async function findHfShards(dir: string): Promise<HfShards> {
  const indexFile = join(dir, 'model.safetensors.index.json');
  if (existsSync(indexFile)) {
    const idx = await readHfJson(indexFile);
    const wm = idx.weight_map as Record<string, unknown> | undefined;
    check(wm && typeof wm === 'object', 'corrupt', `${indexFile}: no "weight_map" object`);
    const weightMap = new Map<string, string>();
    const files: string[] = [];
    for (const [tensor, shard] of Object.entries(wm)) {
      check(typeof shard === 'string', 'corrupt', `${indexFile}: weight_map["${tensor}"] is not a file name`);
      weightMap.set(tensor, shard);
      if (!files.includes(shard)) files.push(shard);
    }
    for (const f of files)
      check(existsSync(join(dir, f)), 'io', `shard "${f}" listed in ${indexFile} is missing from ${dir}`);
    return { files, weightMap };
  }
  if (existsSync(join(dir, 'model.safetensors'))) return { files: ['model.safetensors'] };
  throw new KvpackError('io', `${dir} holds no model.safetensors or model.safetensors.index.json`);
}

/** Reads and maps `config.json` of a Hugging Face model directory (see {@link parseHfConfig}). */
export async function loadHfConfig(dir: string): Promise<LlamaConfig> {
  const file = join(dir, 'config.json');
  check(existsSync(file), 'io', `no config.json in ${dir}`);
  return parseHfConfig(await readHfJson(file), file);
}

/**
 * Loads the weights of a Hugging Face Llama/Mistral/Qwen2 safetensors checkpoint (one file or
 * shards) as float32 {@link LlamaWeights}, matrices transposed to [in, out].
 *
 * Streaming: shards are read one after another and, within a shard, one tensor at a time
 * (read → convert F32/F16/BF16 to float32 → transpose → upload to the tfjs backend → drop the host
 * copy), so the host never holds more than one tensor (plus its transpose) besides the backend's
 * copy of the weights.
 *
 * @throws KvpackError naming the file: 'io' (missing shard), 'unsupported' (tensor dtype),
 *         'shape' (tensor shape vs config.json), 'corrupt' (missing tensor, bad header),
 *         'truncated' (file shorter than its header says).
 */
export async function loadHfWeights(dir: string, config?: LlamaConfig): Promise<LlamaWeights> {
  const cfg = config ?? (await loadHfConfig(dir));
  const shards = await findHfShards(dir);
  const b = new LlamaWeightsBuilder(cfg, 'config.json');
  try {
    for (const shard of shards.files) {
      const f = await SafetensorsFile.open(join(dir, shard));
      try {
        for (const name of f.names()) {
          const slot = hfSlotOf(name);
          if (!slot) continue; // e.g. rotary_emb.inv_freq
          if (slot === 'classifier' && cfg.tiedEmbeddings) continue;
          if (typeof slot === 'object') {
            check(slot.layer < cfg.nLayers, 'shape', `${shard}: tensor "${name}" belongs to layer ${slot.layer} but config.json has ${cfg.nLayers} layers`);
            if (slot.field.startsWith('b') && !cfg.qkvBias)
              throw new KvpackError('unsupported', `${shard}: tensor "${name}" is a bias this architecture's config.json does not declare`);
          }
          const t = await f.readFloat32(name);
          b.set(slot, t.data, t.shape, name, shard);
        }
      } finally {
        await f.close();
      }
    }
    return b.finish(dir, (s) => {
      const name = hfTensorName(s);
      const shard = shards.weightMap?.get(name);
      return shard
        ? `"${name}" (model.safetensors.index.json places it in "${shard}", which lacks it)`
        : `"${name}" (not in ${shards.files.join(', ')})`;
    });
  } catch (e) {
    b.dispose();
    throw e;
  }
}

/** A loaded Hugging Face model. */
export interface HfModel {
  config: LlamaConfig;
  weights: LlamaWeights;
  /** Present when the directory has a tokenizer.json. */
  tokenizer?: HfTokenizer;
}

/**
 * Loads a tokenizer.json from a model directory, with BOS/EOS ids from config.json when present,
 * and checks it fits the model's vocabulary.
 * @throws KvpackError('config') when the tokenizer has ids ≥ config.json's vocab_size. (A tokenizer
 *         with fewer ids than vocab_size is accepted: checkpoints often pad the embedding rows.)
 */
export async function loadHfTokenizer(dir: string, config?: LlamaConfig): Promise<HfTokenizer> {
  const cfg = config ?? (existsSync(join(dir, 'config.json')) ? await loadHfConfig(dir) : undefined);
  const tok = await HfTokenizer.fromFile(join(dir, 'tokenizer.json'), { bosId: cfg?.bosId, eosId: cfg?.eosId });
  if (cfg)
    check(
      tok.vocabSize <= cfg.vocabSize,
      'config',
      `${join(dir, 'tokenizer.json')}: the tokenizer has ${tok.vocabSize} ids but config.json's vocab_size is ${cfg.vocabSize}`,
    );
  return tok;
}

/**
 * Loads a Hugging Face model directory: config.json, safetensors weights, tokenizer.json if any.
 * The tokenizer is checked before the weights are read.
 */
export async function loadHfModel(dir: string): Promise<HfModel> {
  check(existsSync(dir) && statSync(dir).isDirectory(), 'io', `${dir} is not a directory`);
  const config = await loadHfConfig(dir);
  const tokenizer = existsSync(join(dir, 'tokenizer.json')) ? await loadHfTokenizer(dir, config) : undefined;
  const weights = await loadHfWeights(dir, config);
  return { config, weights, ...(tokenizer ? { tokenizer } : {}) };
}

/** True when `dir` looks like a Hugging Face model directory (has config.json and safetensors). */
export function isHfModelDir(dir: string): boolean {
  try {
    if (!statSync(dir).isDirectory() || !existsSync(join(dir, 'config.json'))) return false;
    return readdirSync(dir).some((f) => f.endsWith('.safetensors') || f === 'model.safetensors.index.json');
  } catch {
    return false;
  }
}
