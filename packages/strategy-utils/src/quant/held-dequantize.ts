import * as tf from '@tensorflow/tfjs-core';
import { isWebGpuBackend, type HalfTensor } from '@kvpack/core';
import { CodesTensor, dequantizeOnBackend } from './codes-tensor.js';

/**
 * {@link CodesTensor.unpack} for the hot path: the same float32 codes [n], owned by the caller. On
 * webgpu it is that kernel; on the host backends the packed int32 words are read once and unpacked
 * word by word straight into the float32 array (no byte copy, no per-code division), several times
 * faster than the generic byte unpacker.
 */
export function unpackCodesFast(codes: CodesTensor): tf.Tensor1D {
  if (isWebGpuBackend() || codes.count === 0) return codes.unpack();
  const words = codes.packed.dataSync() as Int32Array;
  const { bits, count: n } = codes;
  const out = new Float32Array(n);
  const per = 32 / bits;
  const mask = (1 << bits) - 1;
  // Whole words unrolled (the common case), then the last partial word.
  const full = Math.floor(n / per);
  if (bits === 4) {
    for (let w = 0, o = 0; w < full; w++, o += 8) {
      const x = words[w];
      out[o] = x & 15;
      out[o + 1] = (x >>> 4) & 15;
      out[o + 2] = (x >>> 8) & 15;
      out[o + 3] = (x >>> 12) & 15;
      out[o + 4] = (x >>> 16) & 15;
      out[o + 5] = (x >>> 20) & 15;
      out[o + 6] = (x >>> 24) & 15;
      out[o + 7] = x >>> 28;
    }
  } else if (bits === 8) {
    for (let w = 0, o = 0; w < full; w++, o += 4) {
      const x = words[w];
      out[o] = x & 255;
      out[o + 1] = (x >>> 8) & 255;
      out[o + 2] = (x >>> 16) & 255;
      out[o + 3] = x >>> 24;
    }
  } else {
    for (let w = 0, o = 0; w < full; w++) {
      let x = words[w];
      for (let j = 0; j < 16; j++, o++) {
        out[o] = x & 3;
        x >>>= 2;
      }
    }
  }
  let i = full * per;
  for (let w = full; i < n; w++) {
    let x = words[w];
    const end = Math.min(n, i + per);
    for (; i < end; i++) {
      out[i] = x & mask;
      x >>>= bits;
    }
  }
  return tf.tensor1d(out, 'float32');
}

/**
 * {@link dequantizeOnBackend}, bit-identical (the same exact integer levels times the same float16
 * scale, rounded once), by broadcasting instead of gathering when every row splits into whole groups
 * (cols a multiple of `quantGroupSize`): codes [rows, groups, gs] against scales and zero points
 * [rows, groups, 1]. Otherwise (a shorter last group) it is `dequantizeOnBackend` itself.
 */
export function dequantizeGroupsOnBackend(
  m: { rows: number; cols: number; bits: 4 | 8; quantGroupSize: number; symmetric: boolean },
  codes: CodesTensor,
  scales: HalfTensor,
  zeros: CodesTensor | null,
): tf.Tensor2D {
  const { rows, cols, bits, quantGroupSize: gs, symmetric } = m;
  if (cols % gs !== 0) return dequantizeOnBackend(m, codes, scales, zeros);
  const gpr = cols / gs;
  const qLo = symmetric ? -(2 ** (bits - 1)) : 0;
  return tf.tidy(() => {
    const u = tf.reshape(unpackCodesFast(codes), [rows, gpr, gs]);
    const shifted = qLo === 0 ? u : tf.add(u, qLo);
    const level = zeros ? tf.sub(shifted, tf.reshape(unpackCodesFast(zeros), [rows, gpr, 1])) : shifted;
    return tf.reshape(tf.mul(level, tf.reshape(scales.unpack(), [rows, gpr, 1])), [rows, cols]) as tf.Tensor2D;
  });
}
