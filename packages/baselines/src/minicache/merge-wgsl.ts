import * as tf from '@tensorflow/tfjs-core';
import { HalfTensor, runFlatWgsl, runPackedHalfWgsl, wgslFlatIndex } from '@kvpack/core';
import { gatherRowsPackedWgsl, packStatsColumn, topKPositionsWgsl } from '@kvpack/strategy-utils';

// MiniCache's merge of one layer pair as a few WGSL kernels on webgpu (the same math as the tfjs
// path of mergeLayerPairOnBackend, see there): per (token, KV head) row the norms and the angle,
// then the SLERP direction written packed as float16, the norms packed, the retained positions
// selected by the shared top-k kernel straight from the angles, and the retained rows gathered and
// packed. No host round trip; six kernels and one transpose per pair and kind.

const FLAT = wgslFlatIndex('flat');

/** Per row r = t·H + h of x0, x1 viewed as [T·H, d]: (‖x0_r‖, ‖x1_r‖, Ω_r, 0), float32 [T·H, 4]. */
function rowStats(x0: tf.Tensor3D, x1: tf.Tensor3D): tf.Tensor2D {
  const [T, H, d] = x0.shape;
  const rows = T * H;
  return runFlatWgsl({
    key: `minicache_row_stats_${d}`,
    names: ['a', 'b'],
    inputs: [x0, x1],
    outputShape: [rows, 4],
    dtype: 'float32',
    invocations: rows,
    code: `const D: u32 = ${d}u;
fn kernel(index: i32) {
  ${FLAT}
  if (flat >= uniforms.outShape[0]) { return; }
  let base = u32(flat) * D;
  var s0 = 0.0;
  var s1 = 0.0;
  for (var c = 0u; c < D; c++) {
    s0 = s0 + a[base + c] * a[base + c];
    s1 = s1 + b[base + c] * b[base + c];
  }
  let n0 = sqrt(s0);
  let n1 = sqrt(s1);
  let i0 = select(0.0, 1.0 / n0, n0 > 0.0);
  let i1 = select(0.0, 1.0 / n1, n1 > 0.0);
  var dm = 0.0;
  var dp = 0.0;
  for (var c = 0u; c < D; c++) {
    let u0 = a[base + c] * i0;
    let u1 = b[base + c] * i1;
    dm = dm + (u0 - u1) * (u0 - u1);
    dp = dp + (u0 + u1) * (u0 + u1);
  }
  // Ω = 2·atan2(‖u0 − u1‖, ‖u0 + u1‖) (arccos(u0·u1), accurate near 0 and π); π/2 for a zero vector.
  let omega = select(2.0 * atan2(sqrt(dm), sqrt(dp)), ${Math.PI / 2}, n0 == 0.0 || n1 == 0.0);
  let o = u32(flat) * 4u;
  result[o] = n0;
  result[o + 1u] = n1;
  result[o + 2u] = omega;
  result[o + 3u] = 0.0;
}`,
  }) as tf.Tensor2D;
}

/** The SLERP direction e [T, H, d] rounded to float16 and packed. */
function direction(x0: tf.Tensor3D, x1: tf.Tensor3D, stats: tf.Tensor2D, t: number, eps: number): HalfTensor {
  const [T, H, d] = x0.shape;
  return runPackedHalfWgsl({
    key: `minicache_direction_${d}_${t}_${eps}`,
    names: ['a', 'b', 'st'],
    inputs: [x0, x1, stats],
    shape: [T, H, d],
    value: 'dirAt',
    size: 'u32(uniforms.aShape[0]) * u32(uniforms.aShape[1]) * D',
    code: `const D: u32 = ${d}u;
const TT: f32 = ${t};
fn dirAt(e: u32) -> f32 {
  let r = e / D;
  let n0 = st[r * 4u];
  let n1 = st[r * 4u + 1u];
  let omega = st[r * 4u + 2u];
  let so = sin(omega);
  let linear = so < ${eps};
  let safe = select(so, 1.0, linear);
  let w0 = select(sin((1.0 - TT) * omega) / safe, 1.0 - TT, linear);
  let w1 = select(sin(TT * omega) / safe, TT, linear);
  let u0 = a[e] * select(0.0, 1.0 / n0, n0 > 0.0);
  let u1 = b[e] * select(0.0, 1.0 / n1, n1 > 0.0);
  return w0 * u0 + w1 * u1;
}`,
  });
}

/**
 * {@link mergeLayerPairOnBackend}'s merge, held at once in the stored form, on webgpu: the packed
 * float16 direction [T, H, d], norms [T, H] and retained rows [k, H, d] of both layers, and the
 * retained positions int32 [k, H] (ascending per KV head; the top-k rule of `topKPositions` over the
 * angles, ties to the lower position). Requires 1 ≤ k < T; the caller handles k = 0 and k = T.
 */
export function mergeAndPackWgsl(
  x0: tf.Tensor3D,
  x1: tf.Tensor3D,
  t: number,
  k: number,
  eps: number,
): { dir: HalfTensor; norm0: HalfTensor; norm1: HalfTensor; idx: tf.Tensor2D; keep0: HalfTensor; keep1: HalfTensor } {
  const [T, H, d] = x0.shape;
  const stats = rowStats(x0, x1);
  const made: (HalfTensor | tf.Tensor)[] = [];
  const keepMade = <X extends HalfTensor | tf.Tensor>(x: X): X => {
    made.push(x);
    return x;
  };
  try {
    const dir = keepMade(direction(x0, x1, stats, t, eps));
    const norm0 = keepMade(packStatsColumn(stats, 0, [T, H]));
    const norm1 = keepMade(packStatsColumn(stats, 1, [T, H]));
    // Row h of the selection scores position t by Ω of row t·H + h.
    const idxHK = keepMade(
      topKPositionsWgsl(
        {
          key: `minicache_omega_${H}`,
          names: ['st'],
          inputs: [stats],
          code: `fn rowLength() -> u32 { return u32(uniforms.stShape[0]) / ${H}u; }
fn score(row: u32, i: u32) -> f32 { return st[(i * ${H}u + row) * 4u + 2u]; }`,
        },
        H,
        T,
        k,
      ),
    );
    const keep0 = keepMade(gatherRowsPackedWgsl(x0, idxHK));
    const keep1 = keepMade(gatherRowsPackedWgsl(x1, idxHK));
    const idx = tf.transpose(idxHK) as tf.Tensor2D;
    idxHK.dispose();
    return { dir, norm0, norm1, idx, keep0, keep1 };
  } catch (e) {
    for (const m of made) m.dispose();
    throw e;
  } finally {
    stats.dispose();
  }
}
