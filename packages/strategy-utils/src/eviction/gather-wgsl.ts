import * as tf from '@tensorflow/tfjs-core';
import { check, runPackedHalfWgsl, type HalfTensor } from '@kvpack/core';

/**
 * The kept rows of x [T, H, d] (float32), rounded to float16 and packed, [n, H, d] — in **one** WGSL
 * dispatch on webgpu (gather, rounding half to even as the host's `encodeHalf`, packing two per
 * word): `idx` int32 [H, n] gives each KV head's own kept tokens (row j of head h is token
 * idx[h, j]), or int32 [n] the same tokens for every head. Equals
 * `HalfTensor.fromTensor(gather(x, …))` bit for bit. Disposes neither input.
 * @throws KvpackError('shape') when x is not 3-D or `idx` does not match its heads.
 */
export function gatherRowsPackedWgsl(x: tf.Tensor, idx: tf.Tensor): HalfTensor {
  check(x.rank === 3 && x.dtype === 'float32', 'shape', `per-head gather: x must be float32 [T, H, d], got ${x.dtype} [${x.shape}]`);
  const [, H, d] = x.shape as [number, number, number];
  check(idx.dtype === 'int32' && (idx.rank === 1 || (idx.rank === 2 && idx.shape[0] === H)), 'shape', `per-head gather: positions must be int32 [H = ${H}, n] or [n], got ${idx.dtype} [${idx.shape}]`);
  const n = idx.rank === 1 ? idx.shape[0] : idx.shape[1]!;
  const shared = idx.rank === 1;
  return runPackedHalfWgsl({
    key: `gather_rows_half_${shared ? 's' : 'h'}`,
    names: ['x', 'idx'],
    inputs: [x, idx],
    shape: [n, H, d],
    value: 'gathered',
    size: `u32(uniforms.idxShape${shared ? '' : '[1]'}) * u32(uniforms.xShape[1]) * u32(uniforms.xShape[2])`,
    code: `fn gathered(e: u32) -> f32 {
  let H = u32(uniforms.xShape[1]);
  let D = u32(uniforms.xShape[2]);
  let row = e / D;
  let c = e - row * D;
  let j = row / H;
  let h = row - j * H;
  let t = u32(${shared ? 'idx[j]' : 'idx[h * u32(uniforms.idxShape[1]) + j]'});
  return x[(t * H + h) * D + c];
}`,
  });
}
