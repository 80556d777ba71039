import * as tf from '@tensorflow/tfjs-core';
import { check, type HalfTensor } from '@kvpack/core';
import type { CodesTensor } from './codes-tensor.js';

/**
 * Grouping of a min–max quantized [n, H, d] block (KIVI's two layouts):
 * - `tokens`: per channel, groups of g consecutive tokens (KIVI's keys); scale and min [n/g, H, d].
 * - `channels`: per token, groups of g consecutive channels of one head (KIVI's values); scale and
 *   min [n, H, d/g].
 */
export type MinMaxGrouping = 'tokens' | 'channels';

/** Shape of the per-group scale (and min) of an [n, H, d] block grouped along `along` by g. */
export function minMaxGroupShape(along: MinMaxGrouping, n: number, H: number, d: number, g: number): [number, number, number] {
  return along === 'tokens' ? [n / g, H, d] : [n, H, d / g];
}

/**
 * Dequantizes a min–max quantized [n, H, d] block held on the backend, x = code · scale + min, as a
 * transient float32 tensor [n, H, d] owned by the caller. Codes are unsigned b-bit (b ≤ 8) and
 * scale, min float16, so code · scale is exact in float32 and the sum is rounded once: the same
 * value as the host's `code * scale + min` stored to float32 (barring a double rounding, which
 * needs the exact sum to span more than 53 bits). Pure broadcasting (no gathers): the groups are
 * contiguous runs of g rows (`tokens`) or g elements (`channels`).
 * @throws KvpackError('shape') when the codes, scale or min do not fit [n, H, d] grouped by g.
 */
export function dequantizeMinMaxOnBackend(
  block: { along: MinMaxGrouping; n: number; H: number; d: number; g: number },
  codes: CodesTensor,
  scale: HalfTensor,
  min: HalfTensor,
): tf.Tensor3D {
  const { along, n, H, d, g } = block;
  const groupShape = minMaxGroupShape(along, n, H, d, g);
  const groups = groupShape[0] * groupShape[1] * groupShape[2];
  check(
    (along === 'tokens' ? n % g === 0 : d % g === 0) && codes.count === n * H * d && scale.size === groups && min.size === groups,
    'shape',
    `min–max block [${n}, ${H}, ${d}] grouped by ${g} ${along}: got ${codes.count} codes, ${scale.size} scales, ${min.size} minima`,
  );
  return tf.tidy(() => {
    // tokens: [n/g, g, H·d] codes against [n/g, 1, H·d] groups; channels: [n·H·d/g, g] against [n·H·d/g, 1].
    const codeShape = along === 'tokens' ? [n / g, g, H * d] : [groups, g];
    const perGroup = along === 'tokens' ? [n / g, 1, H * d] : [groups, 1];
    const u = tf.reshape(codes.unpack(), codeShape);
    const x = tf.add(tf.mul(u, tf.reshape(scale.unpack(), perGroup)), tf.reshape(min.unpack(), perGroup));
    return tf.reshape(x, [n, H, d]) as tf.Tensor3D;
  });
}
