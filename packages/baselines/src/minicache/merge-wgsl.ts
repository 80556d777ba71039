import * as tf from '@tensorflow/tfjs-core';
import { FLAT_WORKGROUP, HalfTensor, flatDispatch, runPackedHalfWgsl, runWgsl, wgslFlatIndex } from '@kvpack/core';
import { gatherRowsPackedWgsl, packStatsColumn, topKPositionsWgsl } from '@kvpack/strategy-utils';

// MiniCache's merge of one layer pair as a few WGSL kernels on webgpu (the same math as the tfjs
// path of mergeLayerPairOnBackend, see there): per (token, KV head) row the norms and the angle,
// then the SLERP direction written packed as float16, the norms packed, the retained positions
// selected by the shared top-k kernel straight from the angles, and the retained rows gathered and
// packed. No host round trip; six kernels and one transpose per pair and kind.


/** Lanes that share one row in {@link rowStats}: a warp's worth, so a row's d floats are read contiguously. */
const ROW_LANES = 32;

/**
 * Per row r = t·H + h of x0, x1 viewed as [T·H, d]: (‖x0_r‖, ‖x1_r‖, Ω_r, 0), float32 [T·H, 4].
 * {@link ROW_LANES} invocations read each row together (coalesced), keep their ⌈d/32⌉ elements in
 * registers and reduce the sums in workgroup memory; a workgroup covers 256 / 32 = 8 rows.
 */
function rowStats(x0: tf.Tensor3D, x1: tf.Tensor3D): tf.Tensor2D {
  const [T, H, d] = x0.shape;
  const rows = T * H;
  const per = Math.ceil(d / ROW_LANES);
  return runWgsl({
    key: `minicache_row_stats_lanes_${d}`,
    names: ['a', 'b'],
    inputs: [x0, x1],
    outputShape: [rows, 4],
    dtype: 'float32',
    workgroupSize: FLAT_WORKGROUP,
    dispatch: flatDispatch(rows * ROW_LANES),
    workgroupBytes: 2 * 4 * FLAT_WORKGROUP,
    code: `const D: u32 = ${d}u;
const LANES: u32 = ${ROW_LANES}u;
var<workgroup> r0: array<f32, ${FLAT_WORKGROUP}>;
var<workgroup> r1: array<f32, ${FLAT_WORKGROUP}>;
// Tree sum of each row's LANES partial sums (every invocation reaches every barrier).
fn laneSums(x: f32, y: f32) -> vec2<f32> {
  let lid = localIndex;
  r0[lid] = x;
  r1[lid] = y;
  workgroupBarrier();
  for (var off = LANES / 2u; off > 0u; off = off >> 1u) {
    if ((lid % LANES) < off) {
      r0[lid] = r0[lid] + r0[lid + off];
      r1[lid] = r1[lid] + r1[lid + off];
    }
    workgroupBarrier();
  }
  let first = lid - lid % LANES;
  let out = vec2<f32>(r0[first], r1[first]);
  workgroupBarrier();
  return out;
}
fn kernel(index: i32) {
  ${wgslFlatIndex('flat')}
  let row = u32(flat) / LANES;
  let lane = u32(flat) % LANES;
  let live = row < u32(uniforms.outShape[0]);
  let base = row * D;
  var va: array<f32, ${per}>;
  var vb: array<f32, ${per}>;
  var s0 = 0.0;
  var s1 = 0.0;
  for (var j = 0u; j < ${per}u; j++) {
    let c = lane + j * LANES;
    let ok = live && c < D;
    va[j] = select(0.0, a[select(0u, base + c, ok)], ok);
    vb[j] = select(0.0, b[select(0u, base + c, ok)], ok);
    s0 = s0 + va[j] * va[j];
    s1 = s1 + vb[j] * vb[j];
  }
  let s = laneSums(s0, s1);
  let n0 = sqrt(s.x);
  let n1 = sqrt(s.y);
  let i0 = select(0.0, 1.0 / n0, n0 > 0.0);
  let i1 = select(0.0, 1.0 / n1, n1 > 0.0);
  var dm = 0.0;
  var dp = 0.0;
  for (var j = 0u; j < ${per}u; j++) {
    let u0 = va[j] * i0;
    let u1 = vb[j] * i1;
    dm = dm + (u0 - u1) * (u0 - u1);
    dp = dp + (u0 + u1) * (u0 + u1);
  }
  let m = laneSums(dm, dp);
  if (!live || lane != 0u) { return; }
  // Ω = 2·atan2(‖u0 − u1‖, ‖u0 + u1‖) (arccos(u0·u1), accurate near 0 and π); π/2 for a zero vector.
  let omega = select(2.0 * atan2(sqrt(m.x), sqrt(m.y)), ${Math.PI / 2}, n0 == 0.0 || n1 == 0.0);
  let o = row * 4u;
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
