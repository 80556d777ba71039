import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { KvpackError, check } from '@kvpack/core';
import type { LlamaConfig, LlamaWeights } from '../types.js';
import { parseHfConfig, type HfConfigOptions } from './config.js';
import { SafetensorsFile } from './safetensors.js';
import { HfTokenizer, readHfJson } from './tokenizer.js';
import { LlamaWeightsBuilder, checkpointShape, type LayerField, type WeightSlot } from './weights.js';

const LAYER_NAMES: Record<LayerField, string> = {
  attnNorm: 'input_layernorm.weight',
  wq: 'self_attn.q_proj.weight',
  wk: 'self_attn.k_proj.weight',
  wv: 'self_attn.v_proj.weight',
  wo: 'self_attn.o_proj.weight',
  bq: 'self_attn.q_proj.bias',
  bk: 'self_attn.k_proj.bias',
  bv: 'self_attn.v_proj.bias',
  qNorm: 'self_attn.q_norm.weight',
  kNorm: 'self_attn.k_norm.weight',
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
 * (every shard it names must exist, as a plain file name in `dir`) or a single `model.safetensors`.
 * @throws KvpackError('io') naming a missing shard, or when the directory holds no weights;
 *         ('corrupt') for an index without a weight_map or naming a shard outside the directory.
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
      check(typeof shard === 'string' && shard.length > 0, 'corrupt', `${indexFile}: weight_map["${tensor}"] is not a file name`);
      check(
        !/[\\/]/.test(shard) && shard !== '.' && shard !== '..',
        'corrupt',
        `${indexFile}: weight_map["${tensor}"] = ${JSON.stringify(shard)} is not a file name in the model directory`,
      );
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

/**
 * Reads and maps `config.json` of a Hugging Face model directory (see {@link parseHfConfig}; its
 * options report keys the loader does not understand).
 */
export async function loadHfConfig(dir: string, options: HfConfigOptions = {}): Promise<LlamaConfig> {
  const file = join(dir, 'config.json');
  check(existsSync(file), 'io', `no config.json in ${dir}`);
  return parseHfConfig(await readHfJson(file), file, options);
}

/**
 * Checks the safetensors headers of a checkpoint against each other, the index and the config, before
 * any tensor is read: with an index, every listed tensor is in the shard it names and every tensor of
 * a shard is listed there; no tensor is in two shards; the layers held are exactly 0..num_hidden_layers−1;
 * every tensor the loader uses has the shape the config implies.
 */
export function checkHfHeaders(dir: string, cfg: LlamaConfig, shards: HfShards, files: SafetensorsFile[], configName: string): void {
  const indexName = 'model.safetensors.index.json';
  const where = new Map<string, string>();
  const layers = new Set<number>();
  files.forEach((f, i) => {
    const shard = shards.files[i];
    for (const name of f.names()) {
      const other = where.get(name);
      check(other === undefined, 'corrupt', `${dir}: tensor "${name}" is stored twice, in "${other}" and in "${shard}"`);
      where.set(name, shard);
      if (shards.weightMap) {
        const listed = shards.weightMap.get(name);
        check(
          listed === shard,
          'corrupt',
          `${join(dir, shard)}: tensor "${name}" ${listed === undefined ? `is not listed in ${indexName}` : `is listed in ${indexName} under "${listed}"`}`,
        );
      }
      const slot = hfSlotOf(name);
      if (slot && typeof slot === 'object') layers.add(slot.layer);
    }
  });
  if (shards.weightMap)
    for (const [name, shard] of shards.weightMap)
      check(where.get(name) === shard, 'corrupt', `${join(dir, indexName)}: missing tensor "${name}" (the index places it in "${shard}", which lacks it)`);
  const held = layers.size === 0 ? 0 : Math.max(...layers) + 1;
  check(
    held === cfg.nLayers,
    'config',
    `${join(dir, configName)}: num_hidden_layers = ${cfg.nLayers} but the safetensors in ${dir} hold ${held} layer${held === 1 ? '' : 's'}` +
      (held ? ` (model.layers.0 … model.layers.${held - 1})` : ''),
  );
  for (let l = 0; l < held; l++) check(layers.has(l), 'corrupt', `${dir}: the safetensors have no tensor of layer ${l} (of 0..${held - 1})`);
  files.forEach((f, i) => {
    for (const name of f.names()) {
      const slot = hfSlotOf(name);
      if (!slot || (slot === 'classifier' && cfg.tiedEmbeddings)) continue;
      if (typeof slot === 'object' && slot.field.startsWith('b') && !cfg.qkvBias)
        throw new KvpackError('unsupported', `${shards.files[i]}: tensor "${name}" is a bias this architecture's ${configName} does not declare`);
      if (typeof slot === 'object' && (slot.field === 'qNorm' || slot.field === 'kNorm') && !cfg.qkNorm)
        throw new KvpackError('unsupported', `${shards.files[i]}: tensor "${name}" is a per-head query/key norm that this architecture's ${configName} does not have`);
      const shape = f.header.tensors.get(name)!.shape;
      const want = checkpointShape(cfg, slot);
      check(
        shape.length === want.length && shape.every((v, k) => v === want[k]),
        'shape',
        `${shards.files[i]}: tensor "${name}" has shape [${shape}] but ${configName} implies [${want}]`,
      );
    }
  });
}

/**
 * Loads the weights of a Hugging Face Llama/Mistral/Qwen2 safetensors checkpoint (one file or
 * shards) as float32 {@link LlamaWeights}, matrices transposed to [in, out].
 *
 * Every shard's header is parsed and checked first (offsets inside the file and not overlapping,
 * dtype × shape = byte length, each tensor listed once and where the index says, the layers held =
 * num_hidden_layers, each used tensor's shape vs config.json); no tensor is read before that.
 *
 * Streaming: shards are read one after another and, within a shard, one tensor at a time
 * (read → convert F32/F16/BF16 to float32 → transpose → upload to the tfjs backend → drop the host
 * copy), so the host never holds more than one tensor (plus its transpose) besides the backend's
 * copy of the weights. On any error every tensor uploaded so far is disposed.
 *
 * @throws KvpackError naming the file: 'io' (missing shard), 'unsupported' (tensor dtype),
 *         'shape' (tensor shape vs config.json), 'config' (num_hidden_layers vs the layers held),
 *         'corrupt' (missing, duplicated or unlisted tensor, bad header), 'truncated' (file shorter
 *         than its header says).
 */
export async function loadHfWeights(dir: string, config?: LlamaConfig): Promise<LlamaWeights> {
  const cfg = config ?? (await loadHfConfig(dir));
  const configName = 'config.json';
  const shards = await findHfShards(dir);
  const files: SafetensorsFile[] = [];
  const b = new LlamaWeightsBuilder(cfg, 'config.json');
  try {
    for (const shard of shards.files) files.push(await SafetensorsFile.open(join(dir, shard)));
    checkHfHeaders(dir, cfg, shards, files, configName);
    for (let i = 0; i < files.length; i++) {
      const f = files[i];
      const shard = shards.files[i];
      for (const name of f.names()) {
        const slot = hfSlotOf(name);
        if (!slot) continue; // e.g. rotary_emb.inv_freq
        if (slot === 'classifier' && cfg.tiedEmbeddings) continue;
        const t = await f.readFloat32(name);
        b.set(slot, t.data, t.shape, name, shard);
      }
      await f.close();
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
  } finally {
    await Promise.all(files.map((f) => f.close()));
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
 * @param options reporting of config.json keys the loader does not understand (see {@link parseHfConfig})
 */
export async function loadHfModel(dir: string, options: HfConfigOptions = {}): Promise<HfModel> {
  check(existsSync(dir) && statSync(dir).isDirectory(), 'io', `${dir} is not a directory`);
  const config = await loadHfConfig(dir, options);
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
