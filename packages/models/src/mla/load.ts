import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { check } from '@kvpack/core';
import type { HfConfigOptions } from '../hf/config.js';
import { findHfShards } from '../hf/load.js';
import { SafetensorsFile } from '../hf/safetensors.js';
import { HfTokenizer, readHfJson } from '../hf/tokenizer.js';
import { parseDeepseekConfig, type DeepseekConfig } from './config.js';
import { DeepseekWeightsBuilder, checkShape, type DeepseekWeights } from './weights.js';

/** Reads and maps config.json of a DeepSeek model directory ({@link parseDeepseekConfig}). */
export async function loadDeepseekConfig(dir: string, options: HfConfigOptions = {}): Promise<DeepseekConfig> {
  const file = join(dir, 'config.json');
  check(existsSync(file), 'io', `no config.json in ${dir}`);
  return parseDeepseekConfig(await readHfJson(file), file, options);
}

/**
 * Loads the weights of a DeepSeek-V2 / V3 safetensors checkpoint (one file or shards, transformers'
 * tensor names: `self_attn.q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`, `kv_a_proj_with_mqa`,
 * `kv_a_layernorm`, `kv_b_proj`, `o_proj`; `mlp.gate_proj`/`up_proj`/`down_proj` in dense layers;
 * `mlp.gate.weight` (+ `e_score_correction_bias` under noaux_tc), `mlp.experts.N.*`,
 * `mlp.shared_experts.*` in MoE layers) as float32 {@link DeepseekWeights}, matrices transposed to
 * [in, out]. Every header is read and every tensor's shape checked against config.json before any
 * tensor is read; tensors are then read, converted and uploaded one at a time. V3's multi-token
 * prediction layers (`num_nextn_predict_layers` past num_hidden_layers) and `rotary_emb` buffers are
 * skipped. On error every uploaded tensor is disposed.
 * @throws KvpackError naming the file and tensor: 'shape' (a tensor, e.g. an expert's, of another
 *   shape than config.json implies), 'corrupt' (a missing tensor, or a layer tensor the config has no
 *   place for), 'unsupported' (dtype), 'io', 'truncated'.
 */
export async function loadDeepseekWeights(dir: string, config?: DeepseekConfig): Promise<DeepseekWeights> {
  const cfg = config ?? (await loadDeepseekConfig(dir));
  const raw = existsSync(join(dir, 'config.json')) ? await readHfJson(join(dir, 'config.json')) : {};
  const nextn = Number.isInteger(raw.num_nextn_predict_layers) ? (raw.num_nextn_predict_layers as number) : 0;
  const shards = await findHfShards(dir);
  const b = new DeepseekWeightsBuilder(cfg);
  const files: SafetensorsFile[] = [];
  const skip = (name: string) => {
    if (name.includes('rotary_emb.')) return true;
    const m = /^model\.layers\.(\d+)\./.exec(name);
    return m !== null && Number(m[1]) >= cfg.nLayers && Number(m[1]) < cfg.nLayers + nextn;
  };
  try {
    for (const shard of shards.files) files.push(await SafetensorsFile.open(join(dir, shard)));
    files.forEach((f, i) => {
      for (const name of f.names()) {
        if (skip(name) || (name === 'lm_head.weight' && cfg.tiedEmbeddings)) continue;
        const spec = b.specs.get(name);
        check(spec, 'corrupt', `${shards.files[i]}: tensor "${name}" is not part of the ${cfg.modelType} model config.json describes`);
        checkShape(name, f.header.tensors.get(name)!.shape, spec.shape, shards.files[i]);
      }
    });
    for (let i = 0; i < files.length; i++) {
      const f = files[i];
      for (const name of f.names()) {
        if (skip(name) || (name === 'lm_head.weight' && cfg.tiedEmbeddings)) continue;
        const t = await f.readFloat32(name);
        b.set(name, t.data, t.shape, shards.files[i]);
      }
      await f.close();
    }
    return b.finish(dir, (name) => `"${name}" (not in ${shards.files.join(', ')})`);
  } catch (e) {
    b.dispose();
    throw e;
  } finally {
    await Promise.all(files.map((f) => f.close()));
  }
}

/** A loaded DeepSeek model directory. */
export interface DeepseekHfModel {
  config: DeepseekConfig;
  weights: DeepseekWeights;
  /** Present when the directory has a tokenizer.json. */
  tokenizer?: HfTokenizer;
}

/**
 * Loads a DeepSeek-V2 / V2-Lite / V3 Hugging Face directory: config.json, safetensors weights,
 * tokenizer.json if any. Wrap the weights in a `DeepseekModel` to run it.
 * @throws KvpackError as {@link parseDeepseekConfig} and {@link loadDeepseekWeights}.
 */
export async function loadDeepseekModel(dir: string, options: HfConfigOptions = {}): Promise<DeepseekHfModel> {
  check(existsSync(dir) && statSync(dir).isDirectory(), 'io', `${dir} is not a directory`);
  const config = await loadDeepseekConfig(dir, options);
  const tokenizer = existsSync(join(dir, 'tokenizer.json'))
    ? await HfTokenizer.fromFile(join(dir, 'tokenizer.json'), { bosId: config.bosId, eosId: config.eosId })
    : undefined;
  const weights = await loadDeepseekWeights(dir, config);
  return { config, weights, ...(tokenizer ? { tokenizer } : {}) };
}
