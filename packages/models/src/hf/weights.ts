import * as tf from '@tensorflow/tfjs-core';
import { KvpackError, check } from '@kvpack/core';
import type { LlamaConfig, LlamaLayerWeights, LlamaWeights } from '../types.js';

/**
 * Transposes a row-major [rows, cols] float32 matrix on the host (blocked for cache locality).
 * Loaders use it to turn PyTorch's [out, in] into kvpack's [in, out].
 */
export function transposeHost(src: Float32Array, rows: number, cols: number): Float32Array {
  check(src.length === rows * cols, 'shape', `transpose: ${src.length} values for [${rows}, ${cols}]`);
  const out = new Float32Array(src.length);
  const B = 32;
  for (let r0 = 0; r0 < rows; r0 += B) {
    const r1 = Math.min(rows, r0 + B);
    for (let c0 = 0; c0 < cols; c0 += B) {
      const c1 = Math.min(cols, c0 + B);
      for (let r = r0; r < r1; r++) {
        const base = r * cols;
        for (let c = c0; c < c1; c++) out[c * rows + r] = src[base + c];
      }
    }
  }
  return out;
}

/** Per-layer weight fields. */
export type LayerField = keyof LlamaLayerWeights;
/** A weight slot: a global tensor or one layer's field. */
export type WeightSlot = 'embedding' | 'finalNorm' | 'classifier' | { layer: number; field: LayerField };

const MATRIX_FIELDS = new Set<LayerField>(['wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3']);

/** "layers.3.wq", "embedding", … */
export function slotName(s: WeightSlot): string {
  return typeof s === 'string' ? s : `layers.${s.layer}.${s.field}`;
}

/**
 * Shape a slot's tensor has in a checkpoint, in PyTorch orientation ([out, in] for matrices; the
 * embedding is [V, D]). Derived from the config alone, so a file disagreeing with its config fails.
 */
export function checkpointShape(c: LlamaConfig, s: WeightSlot): number[] {
  const D = c.dim;
  const q = c.nHeads * c.headDim;
  const kv = c.nKvHeads * c.headDim;
  if (s === 'embedding' || s === 'classifier') return [c.vocabSize, D];
  if (s === 'finalNorm') return [D];
  switch (s.field) {
    case 'attnNorm':
    case 'ffnNorm':
      return [D];
    case 'wq':
      return [q, D];
    case 'wk':
    case 'wv':
      return [kv, D];
    case 'wo':
      return [D, q];
    case 'bq':
      return [q];
    case 'bk':
    case 'bv':
      return [kv];
    case 'qNorm':
    case 'kNorm':
      return [c.headDim];
    case 'w1':
    case 'w3':
      return [c.hiddenDim, D];
    case 'w2':
      return [D, c.hiddenDim];
  }
}

/** Every slot a model with this config needs, in a stable order. */
export function requiredSlots(c: LlamaConfig): WeightSlot[] {
  const out: WeightSlot[] = ['embedding'];
  for (let l = 0; l < c.nLayers; l++) {
    const fields: LayerField[] = ['attnNorm', 'wq', 'wk', 'wv', 'wo', 'ffnNorm', 'w1', 'w2', 'w3'];
    if (c.qkvBias) fields.push('bq', 'bk', 'bv');
    if (c.qkNorm) fields.push('qNorm', 'kNorm');
    for (const field of fields) out.push({ layer: l, field });
  }
  out.push('finalNorm');
  if (!c.tiedEmbeddings) out.push('classifier');
  return out;
}

/**
 * Collects a model's tensors one at a time (host float32, checkpoint orientation), checks each
 * shape against the config, transposes matrices to [in, out] on the host, uploads it to the tfjs
 * backend and drops the host copy. For tied embeddings the classifier is the embedding transposed.
 * On any error, {@link dispose} frees what was uploaded so far.
 */
export class LlamaWeightsBuilder {
  private readonly tensors = new Map<string, tf.Tensor>();

  /**
   * @param config the architecture the tensors must match
   * @param configName what the config came from, for messages ("config.json", "GGUF metadata")
   */
  constructor(
    readonly config: LlamaConfig,
    private readonly configName: string,
  ) {}

  /**
   * Stores one tensor.
   * @param data values in checkpoint orientation ([out, in] for matrices)
   * @param shape the shape the file declares (checkpoint orientation)
   * @param tensorName / file name the file's tensor, for messages
   * @throws KvpackError('shape') naming the tensor, the expected and the found shape.
   */
  set(slot: WeightSlot, data: Float32Array, shape: number[], tensorName: string, file: string): void {
    const want = checkpointShape(this.config, slot);
    check(
      shape.length === want.length && shape.every((v, i) => v === want[i]),
      'shape',
      `${file}: tensor "${tensorName}" has shape [${shape}] but ${this.configName} implies [${want}]`,
    );
    check(data.length === want.reduce((a, b) => a * b, 1), 'shape', `${file}: tensor "${tensorName}" has ${data.length} values for shape [${shape}]`);
    const key = slotName(slot);
    this.tensors.get(key)?.dispose();
    const isMatrix = slot === 'classifier' || (typeof slot === 'object' && MATRIX_FIELDS.has(slot.field));
    if (isMatrix) {
      const [rows, cols] = want;
      this.tensors.set(key, tf.tensor2d(transposeHost(data, rows, cols), [cols, rows], 'float32'));
    } else {
      this.tensors.set(key, tf.tensor(data, want, 'float32'));
    }
    if (slot === 'embedding' && this.config.tiedEmbeddings) {
      const [V, D] = want;
      this.tensors.get('classifier')?.dispose();
      this.tensors.set('classifier', tf.tensor2d(transposeHost(data, V, D), [D, V], 'float32'));
    }
  }

  /** True when the slot was stored. */
  has(slot: WeightSlot): boolean {
    return this.tensors.has(slotName(slot));
  }

  /** Slots still missing. */
  missing(): WeightSlot[] {
    return requiredSlots(this.config).filter((s) => !this.tensors.has(slotName(s)));
  }

  /**
   * Assembles the weights. Ownership of the tensors moves to the result.
   * @param where names the checkpoint, for the error message
   * @param describe maps a missing slot to the file's tensor name (and where it was looked for)
   * @throws KvpackError('corrupt') naming the first missing tensor.
   */
  finish(where: string, describe: (s: WeightSlot) => string): LlamaWeights {
    const miss = this.missing();
    if (miss.length)
      throw new KvpackError(
        'corrupt',
        `${where}: missing tensor ${describe(miss[0])}${miss.length > 1 ? ` (and ${miss.length - 1} more missing)` : ''}`,
      );
    const g = (k: string) => this.tensors.get(k)!;
    const layers: LlamaLayerWeights[] = [];
    for (let l = 0; l < this.config.nLayers; l++) {
      const f = (field: LayerField) => this.tensors.get(`layers.${l}.${field}`);
      layers.push({
        attnNorm: f('attnNorm') as tf.Tensor1D,
        wq: f('wq') as tf.Tensor2D,
        wk: f('wk') as tf.Tensor2D,
        wv: f('wv') as tf.Tensor2D,
        wo: f('wo') as tf.Tensor2D,
        ...(this.config.qkvBias ? { bq: f('bq') as tf.Tensor1D, bk: f('bk') as tf.Tensor1D, bv: f('bv') as tf.Tensor1D } : {}),
        ...(this.config.qkNorm ? { qNorm: f('qNorm') as tf.Tensor1D, kNorm: f('kNorm') as tf.Tensor1D } : {}),
        ffnNorm: f('ffnNorm') as tf.Tensor1D,
        w1: f('w1') as tf.Tensor2D,
        w2: f('w2') as tf.Tensor2D,
        w3: f('w3') as tf.Tensor2D,
      });
    }
    const w: LlamaWeights = {
      config: this.config,
      embedding: g('embedding') as tf.Tensor2D,
      layers,
      finalNorm: g('finalNorm') as tf.Tensor1D,
      classifier: g('classifier') as tf.Tensor2D,
    };
    this.tensors.clear();
    return w;
  }

  /** Frees every tensor stored so far. */
  dispose(): void {
    for (const t of this.tensors.values()) t.dispose();
    this.tensors.clear();
  }
}

/** Frees every tensor of a model's weights. */
export function disposeLlamaWeights(w: LlamaWeights): void {
  const all: tf.Tensor[] = [w.embedding, w.finalNorm];
  if (w.classifier !== w.embedding) all.push(w.classifier);
  for (const l of w.layers) for (const t of Object.values(l)) if (t) all.push(t as tf.Tensor);
  tf.dispose(all);
}
