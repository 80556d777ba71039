import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, check, flatDispatch, isWebGpuBackend, runWgsl, wgslFlatIndex } from '@kvpack/core';

/** Workgroup size of the float16 matrix product. */
const WG = 256;
/** Rows of W each invocation reduces (the K slice). */
const K_SLICE = 256;

/**
 * x · W for a float16 weight matrix held packed (two halves per 32-bit element): x float32 [B, K],
 * W float16 [K, N] row-major (N even), result float32 [B, N]. On webgpu one WGSL kernel reads the packed
 * words and unpacks them in registers (`unpack2x16float`): each invocation owns two adjacent output
 * columns (one word per row) for every row of x over a slice of K_SLICE rows of W, and the slices' partial
 * sums are added by one reduction — so a decode step reads each weight once, at 2 bytes, with enough
 * invocations to keep a GPU's memory busy at batch 1. Elsewhere W is unpacked to a transient float32
 * matrix and multiplied (tf.matMul). Does not dispose its inputs.
 * @throws KvpackError('shape') for mismatched shapes, an odd N, or B above 16.
 */
export function halfMatMul(x: tf.Tensor2D, w: HalfTensor): tf.Tensor2D {
  check(w.shape.length === 2, 'shape', `halfMatMul: W must be 2-D [K, N], got [${w.shape}]`);
  const [K, N] = w.shape;
  const [B, Kx] = x.shape;
  check(Kx === K, 'shape', `halfMatMul: x is [${x.shape}] but W is [${w.shape}] (inner sizes differ)`);
  check(x.dtype === 'float32', 'dtype', `halfMatMul: x must be float32, got ${x.dtype}`);
  if (!isWebGpuBackend()) return tf.tidy(() => tf.matMul(x, w.unpack() as tf.Tensor2D));
  check(N % 2 === 0, 'shape', `halfMatMul: N = ${N} must be even (one packed word holds two columns)`);
  check(B >= 1 && B <= 16, 'shape', `halfMatMul: at most 16 rows of x per product on webgpu, got ${B}`);
  const words = N / 2;
  const slices = Math.ceil(K / K_SLICE);
  const n = words * slices;
  const acc = Array.from({ length: B }, (_, b) => `var a${b} = vec2<f32>(0.0);`).join('\n  ');
  const fma = Array.from({ length: B }, (_, b) => `a${b} = a${b} + x[${b * K} + k] * w;`).join('\n    ');
  const store = Array.from({ length: B }, (_, b) => `result[((s * ${B} + ${b}) * ${words} + j) * 2] = a${b}.x;\n  result[((s * ${B} + ${b}) * ${words} + j) * 2 + 1] = a${b}.y;`).join('\n  ');
  return tf.tidy(() => {
    const partial = runWgsl({
      key: `half_matmul_${B}_${K}_${N}`,
      names: ['x', 'wp'],
      inputs: [x, w.packed],
      outputShape: [slices * B * N],
      dtype: 'float32',
      workgroupSize: WG,
      dispatch: flatDispatch(n, WG),
      workgroupBytes: 0,
      code: `fn kernel(index: i32) {
  ${wgslFlatIndex('flat', WG)}
  if (flat >= ${n}) { return; }
  let j = flat % ${words};
  let s = flat / ${words};
  let k0 = s * ${K_SLICE};
  let k1 = min(k0 + ${K_SLICE}, ${K});
  ${acc}
  for (var k = k0; k < k1; k = k + 1) {
    let w = unpack2x16float(bitcast<u32>(wp[k * ${words} + j]));
    ${fma}
  }
  ${store}
}`,
    });
    return (slices === 1 ? tf.reshape(partial, [B, N]) : tf.sum(tf.reshape(partial, [slices, B, N]), 0)) as tf.Tensor2D;
  });
}
