import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, check } from '@kvpack/core';
import { transposeHost } from '../hf/weights.js';
import { isMoeLayer, type DeepseekConfig } from './config.js';

/** A SwiGLU feed-forward y = W2·(silu(W1·x) ⊙ W3·x), matrices stored [in, out]. */
export interface SwigluWeights {
  w1: tf.Tensor2D; // gate [D, F]
  w2: tf.Tensor2D; // down [F, D]
  w3: tf.Tensor2D; // up [D, F]
}

/** A DeepSeek mixture-of-experts feed-forward. */
export interface MoeWeights {
  /** Router [D, E]. */
  gate: tf.Tensor2D;
  /** V3's e_score_correction_bias [E], added to the scores for choosing experts only (host copy: routing runs on the host). */
  scoreBias?: Float32Array;
  experts: SwigluWeights[];
  /** The shared experts as one SwiGLU of width moeHiddenDim · nSharedExperts. */
  shared?: SwigluWeights;
}

/**
 * One DeepSeek decoder layer, matrices stored **[in, out]** (loaders transpose PyTorch's [out, in]).
 * With q_lora_rank, queries are wqB·RMSNorm(wqA·x); without it, wq·x.
 */
export interface MlaLayerWeights {
  attnNorm: tf.Tensor1D; // [D]
  wq?: tf.Tensor2D; // [D, H·(d_n + d_r)]
  wqA?: tf.Tensor2D; // [D, q_lora_rank]
  qANorm?: tf.Tensor1D; // [q_lora_rank]
  wqB?: tf.Tensor2D; // [q_lora_rank, H·(d_n + d_r)]
  /** kv_a_proj_with_mqa: [D, r + d_r] — the latent (before its norm) then the pre-RoPE shared key. */
  wkvA: tf.Tensor2D;
  kvANorm: tf.Tensor1D; // [r]
  /** kv_b_proj: [r, H·(d_n + d_v)] — per head W_UK (d_n columns) then W_UV (d_v columns). */
  wkvB: tf.Tensor2D;
  wo: tf.Tensor2D; // [H·d_v, D]
  ffnNorm: tf.Tensor1D; // [D]
  /** Dense layers. */
  mlp?: SwigluWeights;
  /** MoE layers. */
  moe?: MoeWeights;
}

/** All weights of a DeepSeek MLA model, float32 on the tfjs backend. */
export interface DeepseekWeights {
  config: DeepseekConfig;
  embedding: tf.Tensor2D; // [V, D]
  layers: MlaLayerWeights[];
  finalNorm: tf.Tensor1D; // [D]
  /** [D, V] (for tied embeddings, the embedding transposed at load). */
  classifier: tf.Tensor2D;
}

/** Where a checkpoint tensor goes: a key path into {@link DeepseekWeights} and its checkpoint shape. */
export interface DeepseekTensorSpec {
  /** `embedding`, `layers.3.wkvA`, `layers.3.moe.experts.5.w1`, `layers.3.moe.scoreBias`, … */
  key: string;
  /** Shape in the checkpoint (PyTorch orientation: [out, in] for matrices). */
  shape: number[];
  /** A matrix transposed to [in, out] on load. */
  matrix: boolean;
}

/**
 * Every tensor a DeepSeek checkpoint with this config holds, by its transformers name
 * (`model.layers.0.self_attn.kv_a_proj_with_mqa.weight`, `model.layers.1.mlp.experts.3.gate_proj.weight`,
 * `model.layers.1.mlp.gate.e_score_correction_bias`, …), with the shape the config implies.
 */
export function deepseekTensorSpecs(c: DeepseekConfig): Map<string, DeepseekTensorSpec> {
  const D = c.dim;
  const H = c.nHeads;
  const out = new Map<string, DeepseekTensorSpec>();
  const mat = (name: string, key: string, rows: number, cols: number) => out.set(name, { key, shape: [rows, cols], matrix: true });
  const vec = (name: string, key: string, n: number) => out.set(name, { key, shape: [n], matrix: false });
  const swiglu = (prefix: string, key: string, F: number) => {
    mat(`${prefix}.gate_proj.weight`, `${key}.w1`, F, D);
    mat(`${prefix}.up_proj.weight`, `${key}.w3`, F, D);
    mat(`${prefix}.down_proj.weight`, `${key}.w2`, D, F);
  };
  mat('model.embed_tokens.weight', 'embedding', c.vocabSize, D);
  out.get('model.embed_tokens.weight')!.matrix = false;
  const qOut = H * (c.qkNopeHeadDim + c.qkRopeHeadDim);
  for (let l = 0; l < c.nLayers; l++) {
    const p = `model.layers.${l}`;
    const k = `layers.${l}`;
    vec(`${p}.input_layernorm.weight`, `${k}.attnNorm`, D);
    if (c.qLoraRank === null) mat(`${p}.self_attn.q_proj.weight`, `${k}.wq`, qOut, D);
    else {
      mat(`${p}.self_attn.q_a_proj.weight`, `${k}.wqA`, c.qLoraRank, D);
      vec(`${p}.self_attn.q_a_layernorm.weight`, `${k}.qANorm`, c.qLoraRank);
      mat(`${p}.self_attn.q_b_proj.weight`, `${k}.wqB`, qOut, c.qLoraRank);
    }
    mat(`${p}.self_attn.kv_a_proj_with_mqa.weight`, `${k}.wkvA`, c.kvLoraRank + c.qkRopeHeadDim, D);
    vec(`${p}.self_attn.kv_a_layernorm.weight`, `${k}.kvANorm`, c.kvLoraRank);
    mat(`${p}.self_attn.kv_b_proj.weight`, `${k}.wkvB`, H * (c.qkNopeHeadDim + c.vHeadDim), c.kvLoraRank);
    mat(`${p}.self_attn.o_proj.weight`, `${k}.wo`, D, H * c.vHeadDim);
    vec(`${p}.post_attention_layernorm.weight`, `${k}.ffnNorm`, D);
    if (isMoeLayer(c, l)) {
      const m = c.moe!;
      mat(`${p}.mlp.gate.weight`, `${k}.moe.gate`, m.nRoutedExperts, D);
      if (m.topkMethod === 'noaux_tc') vec(`${p}.mlp.gate.e_score_correction_bias`, `${k}.moe.scoreBias`, m.nRoutedExperts);
      for (let e = 0; e < m.nRoutedExperts; e++) swiglu(`${p}.mlp.experts.${e}`, `${k}.moe.experts.${e}`, m.moeHiddenDim);
      if (m.nSharedExperts > 0) swiglu(`${p}.mlp.shared_experts`, `${k}.moe.shared`, m.moeHiddenDim * m.nSharedExperts);
    } else swiglu(`${p}.mlp`, `${k}.mlp`, c.hiddenDim);
  }
  vec('model.norm.weight', 'finalNorm', D);
  if (!c.tiedEmbeddings) mat('lm_head.weight', 'classifier', c.vocabSize, D);
  return out;
}

/**
 * Collects a DeepSeek model's tensors one at a time (host float32, checkpoint orientation), checks
 * each against the shape the config implies, transposes matrices to [in, out], uploads them and drops
 * the host copy. {@link dispose} frees what was uploaded when loading fails.
 */
export class DeepseekWeightsBuilder {
  private readonly tensors = new Map<string, tf.Tensor>();
  private readonly host = new Map<string, Float32Array>();
  readonly specs: Map<string, DeepseekTensorSpec>;

  constructor(
    readonly config: DeepseekConfig,
    private readonly configName = 'config.json',
  ) {
    this.specs = deepseekTensorSpecs(config);
  }

  /** True when `name` is a tensor this config uses. */
  wants(name: string): boolean {
    return this.specs.has(name);
  }

  /**
   * Stores one tensor by its checkpoint name.
   * @throws KvpackError('shape') naming the tensor, the found and the expected shape;
   *   ('corrupt') for a name the config does not use.
   */
  set(name: string, data: Float32Array, shape: number[], file: string): void {
    const spec = this.specs.get(name);
    check(spec, 'corrupt', `${file}: tensor "${name}" is not part of the model ${this.configName} describes`);
    checkShape(name, shape, spec.shape, file, this.configName);
    check(data.length === spec.shape.reduce((a, b) => a * b, 1), 'shape', `${file}: tensor "${name}" has ${data.length} values for shape [${shape}]`);
    this.tensors.get(spec.key)?.dispose();
    if (spec.key.endsWith('.scoreBias')) this.host.set(spec.key, Float32Array.from(data));
    else if (spec.matrix) {
      const [rows, cols] = spec.shape;
      this.tensors.set(spec.key, tf.tensor2d(transposeHost(data, rows, cols), [cols, rows], 'float32'));
    } else this.tensors.set(spec.key, tf.tensor(data, spec.shape, 'float32'));
    if (spec.key === 'embedding' && this.config.tiedEmbeddings) {
      const [V, D] = spec.shape;
      this.tensors.get('classifier')?.dispose();
      this.tensors.set('classifier', tf.tensor2d(transposeHost(data, V, D), [D, V], 'float32'));
    }
  }

  /** Checkpoint names still missing. */
  missing(): string[] {
    return [...this.specs].filter(([, s]) => !this.tensors.has(s.key) && !this.host.has(s.key)).map(([n]) => n);
  }

  /**
   * Assembles the weights; ownership of the tensors moves to the result.
   * @param describe says where a missing tensor was looked for
   * @throws KvpackError('corrupt') naming the first missing tensor.
   */
  finish(where: string, describe: (name: string) => string = (n) => `"${n}"`): DeepseekWeights {
    const miss = this.missing();
    if (miss.length)
      throw new KvpackError('corrupt', `${where}: missing tensor ${describe(miss[0])}${miss.length > 1 ? ` (and ${miss.length - 1} more missing)` : ''}`);
    const g = <T extends tf.Tensor>(k: string) => this.tensors.get(k) as T;
    const c = this.config;
    const swiglu = (k: string): SwigluWeights => ({ w1: g(`${k}.w1`), w2: g(`${k}.w2`), w3: g(`${k}.w3`) });
    const layers: MlaLayerWeights[] = [];
    for (let l = 0; l < c.nLayers; l++) {
      const k = `layers.${l}`;
      const lw: MlaLayerWeights = {
        attnNorm: g(`${k}.attnNorm`),
        ...(c.qLoraRank === null ? { wq: g<tf.Tensor2D>(`${k}.wq`) } : { wqA: g<tf.Tensor2D>(`${k}.wqA`), qANorm: g<tf.Tensor1D>(`${k}.qANorm`), wqB: g<tf.Tensor2D>(`${k}.wqB`) }),
        wkvA: g(`${k}.wkvA`),
        kvANorm: g(`${k}.kvANorm`),
        wkvB: g(`${k}.wkvB`),
        wo: g(`${k}.wo`),
        ffnNorm: g(`${k}.ffnNorm`),
      };
      if (isMoeLayer(c, l)) {
        const m = c.moe!;
        const biasKey = `${k}.moe.scoreBias`;
        lw.moe = {
          gate: g(`${k}.moe.gate`),
          ...(this.host.has(biasKey) ? { scoreBias: this.host.get(biasKey)! } : {}),
          experts: Array.from({ length: m.nRoutedExperts }, (_, e) => swiglu(`${k}.moe.experts.${e}`)),
          ...(m.nSharedExperts > 0 ? { shared: swiglu(`${k}.moe.shared`) } : {}),
        };
      } else lw.mlp = swiglu(`${k}.mlp`);
      layers.push(lw);
    }
    const w: DeepseekWeights = { config: c, embedding: g('embedding'), layers, finalNorm: g('finalNorm'), classifier: g('classifier') };
    this.tensors.clear();
    this.host.clear();
    return w;
  }

  /** Frees every tensor stored so far. */
  dispose(): void {
    for (const t of this.tensors.values()) t.dispose();
    this.tensors.clear();
    this.host.clear();
  }
}

/** @throws KvpackError('shape') naming the tensor when `shape` ≠ `want`. */
export function checkShape(name: string, shape: readonly number[], want: readonly number[], file: string, configName = 'config.json'): void {
  check(
    shape.length === want.length && shape.every((v, i) => v === want[i]),
    'shape',
    `${file}: tensor "${name}" has shape [${shape}] but ${configName} implies [${want}]`,
  );
}

/** Every weight tensor of a DeepSeek model with its key, in a fixed order (the fingerprint's order). */
export function namedDeepseekTensors(w: DeepseekWeights): [string, tf.Tensor][] {
  const out: [string, tf.Tensor][] = [['embedding', w.embedding]];
  const add = (k: string, t: tf.Tensor | undefined) => t && out.push([k, t]);
  const sw = (k: string, s: SwigluWeights | undefined) => s && (add(`${k}.w1`, s.w1), add(`${k}.w2`, s.w2), add(`${k}.w3`, s.w3));
  w.layers.forEach((l, i) => {
    const k = `layers.${i}`;
    for (const f of ['attnNorm', 'wq', 'wqA', 'qANorm', 'wqB', 'wkvA', 'kvANorm', 'wkvB', 'wo', 'ffnNorm'] as const) add(`${k}.${f}`, l[f]);
    sw(`${k}.mlp`, l.mlp);
    if (l.moe) {
      add(`${k}.moe.gate`, l.moe.gate);
      l.moe.experts.forEach((e, j) => sw(`${k}.moe.experts.${j}`, e));
      sw(`${k}.moe.shared`, l.moe.shared);
    }
  });
  out.push(['finalNorm', w.finalNorm], ['classifier', w.classifier]);
  return out;
}

/** Frees every tensor of a DeepSeek model's weights. */
export function disposeDeepseekWeights(w: DeepseekWeights): void {
  const all = namedDeepseekTensors(w).map(([, t]) => t);
  tf.dispose(w.classifier === w.embedding ? all.filter((t, i, a) => a.indexOf(t) === i) : all);
}
