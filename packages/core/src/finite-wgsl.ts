import * as tf from '@tensorflow/tfjs-core';
import { FLAT_WORKGROUP, runWgsl } from './webgpu.js';

/** Most workgroups of one scan: each thread then strides over the tensor (enough to keep a GPU's memory busy). */
const SCAN_WORKGROUPS = 512;

// A float32 is NaN or ±Inf exactly when its 8 exponent bits are all set. Each thread checks four
// strided elements per iteration (four loads in flight), ORs its verdict into a workgroup word, and
// each workgroup writes one int32 flag. Width 4 reads the tensor as vec4s (a quarter of the loads).
function scanCode(width: 1 | 4): string {
  const t = width === 4 ? 'vec4<u32>' : 'u32';
  const e = width === 4 ? 'vec4<u32>(0x7f800000u)' : '0x7f800000u';
  const bad = width === 4 ? `any((bitcast<${t}>(v) & ${e}) == ${e})` : `(bitcast<${t}>(v) & ${e}) == ${e}`;
  return `
var<workgroup> found: atomic<u32>;
fn isBad(v: ${width === 4 ? 'vec4<f32>' : 'f32'}) -> u32 {
  return select(0u, 1u, ${bad});
}
fn kernel(index: i32) {
  if (localIndex == 0u) { atomicStore(&found, 0u); }
  workgroupBarrier();
  let n = uniforms.xShape / ${width};
  let s = i32(numWorkgroups.x) * ${FLAT_WORKGROUP};
  var i = i32(workgroupId.x) * ${FLAT_WORKGROUP} + i32(localId.x);
  var bad = 0u;
  loop {
    if (i + 3 * s >= n) { break; }
    bad = bad | isBad(x[i]) | isBad(x[i + s]) | isBad(x[i + 2 * s]) | isBad(x[i + 3 * s]);
    i = i + 4 * s;
  }
  loop {
    if (i >= n) { break; }
    bad = bad | isBad(x[i]);
    i = i + s;
  }
  if (bad != 0u) { atomicOr(&found, 1u); }
  workgroupBarrier();
  if (localIndex == 0u) { result[workgroupId.x] = i32(atomicLoad(&found)); }
}`;
}

/**
 * One int32 per tensor, 1 when it holds a NaN or ±Inf and 0 otherwise, on the webgpu backend: one
 * memory-bound scan kernel per tensor (a float32 tensor of any shape and non-zero size), then one
 * max over each tensor's workgroup flags. Call inside tf.tidy. @internal
 */
export function nonFiniteFlagsWgsl(xs: readonly tf.Tensor[]): tf.Tensor1D {
  const parts = xs.map((x) => {
    // A size divisible by 4 is read as vec4s (a quarter of the loads).
    const wide = x.size % 4 === 0;
    const groups = Math.min(SCAN_WORKGROUPS, Math.ceil(x.size / (wide ? 4 : 1) / FLAT_WORKGROUP));
    const flags = runWgsl({
      key: wide ? 'nonfinite_scan_x4' : 'nonfinite_scan',
      names: ['x'],
      inputs: [tf.reshape(x, [-1])],
      outputShape: [groups],
      dtype: 'int32',
      workgroupSize: FLAT_WORKGROUP,
      dispatch: [groups, 1, 1],
      workgroupBytes: 4,
      code: scanCode(wide ? 4 : 1),
      ...(wide ? { components: { inputs: [4] } } : {}),
    });
    // Pad to the widest so every tensor's flags are one row of one [n, SCAN_WORKGROUPS] matrix.
    return groups === SCAN_WORKGROUPS ? flags : tf.pad(flags, [[0, SCAN_WORKGROUPS - groups]]);
  });
  return tf.max(tf.stack(parts), 1) as tf.Tensor1D;
}
