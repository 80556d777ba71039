import * as tf from '@tensorflow/tfjs-core';
import { check, validateLayout } from '@kvpack/core';
import type { LlamaWeights } from '../types.js';

/**
 * Checks that weights match their config: layout, every tensor's shape ([in, out] matrices) and
 * dtype, and the q/k/v biases when `qkvBias`.
 * @throws KvpackError('layout' | 'shape' | 'dtype' | 'config') naming the tensor.
 */
export function checkLlamaWeights(w: LlamaWeights): void {
  const c = w.config;
  validateLayout(c);
  for (const k of ['dim', 'hiddenDim', 'vocabSize', 'maxSeqLen'] as const)
    check(Number.isInteger(c[k]) && c[k] > 0, 'config', `model config: ${k} must be a positive integer, got ${c[k]}`);
  check(Number.isFinite(c.normEps) && c.normEps >= 0, 'config', `model config: normEps must be a finite number ≥ 0, got ${c.normEps}`);
  check(c.headDim % 2 === 0, 'config', `model config: head_dim ${c.headDim} must be even for RoPE`);
  check(w.layers.length === c.nLayers, 'layout', `weights have ${w.layers.length} layers but the config says ${c.nLayers}`);
  const D = c.dim;
  const q = c.nHeads * c.headDim;
  const kv = c.nKvHeads * c.headDim;
  const F = c.hiddenDim;
  const expect = (t: tf.Tensor | undefined, shape: number[], name: string) => {
    check(t instanceof tf.Tensor, 'shape', `weight ${name} is missing (expected a tensor [${shape}])`);
    check(t.dtype === 'float32', 'dtype', `weight ${name} has dtype ${t.dtype}, expected float32`);
    check(t.rank === shape.length && t.shape.every((v, i) => v === shape[i]), 'shape', `weight ${name} has shape [${t.shape}], expected [${shape}]`);
  };
  expect(w.embedding, [c.vocabSize, D], 'embedding');
  expect(w.finalNorm, [D], 'finalNorm');
  expect(w.classifier, [D, c.vocabSize], 'classifier');
  w.layers.forEach((l, i) => {
    const p = `layers.${i}.`;
    expect(l.attnNorm, [D], p + 'attnNorm');
    expect(l.wq, [D, q], p + 'wq');
    expect(l.wk, [D, kv], p + 'wk');
    expect(l.wv, [D, kv], p + 'wv');
    expect(l.wo, [q, D], p + 'wo');
    expect(l.ffnNorm, [D], p + 'ffnNorm');
    expect(l.w1, [D, F], p + 'w1');
    expect(l.w2, [F, D], p + 'w2');
    expect(l.w3, [D, F], p + 'w3');
    if (c.qkNorm) {
      expect(l.qNorm, [c.headDim], p + 'qNorm');
      expect(l.kNorm, [c.headDim], p + 'kNorm');
    }
    if (c.windows !== undefined)
      check(
        Array.isArray(c.windows) && c.windows.length === c.nLayers && c.windows.every((w) => w === null || (Number.isInteger(w) && w > 0)),
        'config',
        `model config: windows must give each of the ${c.nLayers} layers a sliding window (positive integer, tokens) or null`,
      );
    if (c.qkvBias) {
      expect(l.bq, [q], p + 'bq');
      expect(l.bk, [kv], p + 'bk');
      expect(l.bv, [kv], p + 'bv');
    }
  });
}
