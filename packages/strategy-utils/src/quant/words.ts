import * as tf from '@tensorflow/tfjs-core';
import { FLAT_WORKGROUP, flatDispatch, isWebGpuBackend, runWgsl, wgslFlatIndex } from '@kvpack/core';

/*
 * Joining and cutting packed int32 words (packed codes, packed float16) on the backend. tfjs-webgpu's
 * own concat and slice move int32 values through float32, which rounds bit patterns above 2^24; on
 * webgpu these copies are WGSL kernels that move the words as they are.
 */

const WG = FLAT_WORKGROUP;
const grid = (n: number) => flatDispatch(n);
const FLAT = wgslFlatIndex('i');

/** The words of `a` then `b`, int32 [na + nb], a new tensor (neither input is disposed). */
export function concatWords(a: tf.Tensor1D, b: tf.Tensor1D): tf.Tensor1D {
  if (!isWebGpuBackend() || a.size === 0 || b.size === 0) return tf.concat([a, b]);
  const n = a.size + b.size;
  return runWgsl({
    key: 'concat_words',
    names: ['a', 'b'],
    inputs: [a, b],
    outputShape: [n],
    dtype: 'int32',
    workgroupSize: WG,
    dispatch: grid(n),
    workgroupBytes: 0,
    code: `fn kernel(index: i32) {
  ${FLAT}
  if (i >= uniforms.outShape) { return; }
  if (i < uniforms.aShape) { result[i] = a[i]; } else { result[i] = b[i - uniforms.aShape]; }
}`,
  }) as tf.Tensor1D;
}

/** The words of all `parts` in order (a balanced tree of {@link concatWords}), a new tensor; the parts are not disposed. */
export function concatAllWords(parts: tf.Tensor1D[]): tf.Tensor1D {
  if (parts.length === 1) return tf.clone(parts[0]);
  if (!isWebGpuBackend()) return tf.concat(parts);
  const mid = parts.length >> 1;
  const left = concatAllWords(parts.slice(0, mid));
  const right = concatAllWords(parts.slice(mid));
  try {
    return concatWords(left, right);
  } finally {
    left.dispose();
    right.dispose();
  }
}

/** The last `count` words of x, int32 [count], a new tensor (x is not disposed). */
export function lastWords(x: tf.Tensor1D, count: number): tf.Tensor1D {
  if (!isWebGpuBackend() || count === 0) return tf.slice(x, [x.size - count], [count]);
  return runWgsl({
    key: 'last_words',
    names: ['x'],
    inputs: [x],
    outputShape: [count],
    dtype: 'int32',
    workgroupSize: WG,
    dispatch: grid(count),
    workgroupBytes: 0,
    code: `fn kernel(index: i32) {
  ${FLAT}
  if (i >= uniforms.outShape) { return; }
  result[i] = x[uniforms.xShape - uniforms.outShape + i];
}`,
  }) as tf.Tensor1D;
}
