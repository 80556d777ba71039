import * as tf from '@tensorflow/tfjs-core';
import { roundToHalf, type StoredReader, type StoredSpec } from '@kvpack/core';
import { dequantizeMatrix, quantizeMatrix, quantizedSpecs, readQuantized, type QuantSpec, type QuantizedMatrix } from '../quant/quantize.js';
import type { GroupSvdConfig } from './group-config.js';

/* The stored matrices of a grouped low-rank cache (token bases and per-layer factors): float16/float32, or group-quantized. */

/** One stored matrix: its values as held on the backend, and its quantized form when quantized. */
export interface Block {
  name: string;
  rows: number;
  cols: number;
  /** float32 values equal to what deserialization restores, [rows, cols]. */
  tensor: tf.Tensor2D;
  quant: QuantizedMatrix | null;
}

/** The stored matrices of one kind (keys or values). */
export interface KindBlocks {
  /** Shared token basis per group, [T, R_g]. */
  basis: Block[];
  /** Reconstruction factor per layer, [R_g, H_kv·d]. */
  factors: Block[];
}

function quantFor(config: GroupSvdConfig, part: 'basis' | 'factors'): QuantSpec | null {
  const q = config.factorQuantization;
  if (!q || (q.apply !== 'both' && q.apply !== part)) return null;
  return { bits: q.bits, quantGroupSize: q.quantGroupSize, symmetric: q.symmetric };
}

/** Makes a stored block from float32 values: quantizes, or rounds through float16, as configured. Takes ownership of `x`. */
export async function makeBlock(name: string, x: tf.Tensor2D, config: GroupSvdConfig, part: 'basis' | 'factors'): Promise<Block> {
  const [rows, cols] = x.shape;
  const spec = quantFor(config, part);
  if (spec) {
    const quant = quantizeMatrix((await x.data()) as Float32Array, rows, cols, spec);
    x.dispose();
    return { name, rows, cols, tensor: tf.tensor2d(dequantizeMatrix(quant), [rows, cols]), quant };
  }
  if (config.storage === 'float16') {
    const t = (await roundToHalf(x)) as tf.Tensor2D;
    x.dispose();
    return { name, rows, cols, tensor: t, quant: null };
  }
  return { name, rows, cols, tensor: x, quant: null };
}

export function blockSpecs(b: Block, storage: 'float16' | 'float32'): StoredSpec[] {
  return b.quant ? quantizedSpecs(b.name, b.quant) : [{ name: b.name, dtype: storage, shape: [b.rows, b.cols] }];
}

/** Restores a stored block from a decoded container (dequantized when the config quantizes this part). */
export function loadBlock(r: StoredReader, config: GroupSvdConfig, name: string, rows: number, cols: number, part: 'basis' | 'factors'): Block {
  const spec = quantFor(config, part);
  if (!spec) return { name, rows, cols, tensor: r.tensor<tf.Tensor2D>(name, { dtype: config.storage, shape: [rows, cols] }), quant: null };
  const quant = readQuantized(r, name, rows, cols, spec);
  return { name, rows, cols, tensor: tf.tensor2d(dequantizeMatrix(quant), [rows, cols]), quant };
}
