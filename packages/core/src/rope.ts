import * as tf from '@tensorflow/tfjs-core';
import { check } from './errors.js';
import { isWebGpuBackend, runFlatWgsl, wgslFlatIndex } from './webgpu.js';
import type { RopeConfig } from './types.js';

/**
 * RoPE inverse frequencies for head_dim `d` (length d/2), float64, with `rope.scaling` applied as in
 * Hugging Face `modeling_rope_utils.py` (`linear`, `llama3`).
 */
export function ropeInverseFrequencies(rope: RopeConfig, headDim: number): Float64Array {
  check(headDim % 2 === 0, 'shape', `RoPE needs an even head_dim, got ${headDim}`);
  const half = headDim / 2;
  const inv = new Float64Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / Math.pow(rope.theta, (2 * i) / headDim);
  const s = rope.scaling;
  if (!s) return inv;
  if (s.type === 'yarn') {
    // DeepSeek's yarn_find_correction_range and yarn_linear_ramp_mask, over the d/2 frequencies.
    const corrDim = (rot: number) => (headDim * Math.log(s.originalMaxPositionEmbeddings / (rot * 2 * Math.PI))) / (2 * Math.log(rope.theta));
    const low = Math.max(Math.floor(corrDim(s.betaFast)), 0);
    let high = Math.min(Math.ceil(corrDim(s.betaSlow)), headDim - 1);
    if (low === high) high += 0.001;
    for (let i = 0; i < half; i++) {
      const ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));
      const extra = 1 - ramp; // weight of the extrapolated (unscaled) frequency
      inv[i] = (inv[i] / s.factor) * (1 - extra) + inv[i] * extra;
    }
    return inv;
  }
  if (s.type === 'linear') {
    for (let i = 0; i < half; i++) inv[i] /= s.factor;
    return inv;
  }
  const lowWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
  const highWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
  for (let i = 0; i < half; i++) {
    const wavelen = (2 * Math.PI) / inv[i];
    if (wavelen > lowWavelen) inv[i] = inv[i] / s.factor;
    else if (wavelen >= highWavelen) {
      const smooth =
        (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
      inv[i] = (1 - smooth) * (inv[i] / s.factor) + smooth * inv[i];
    }
  }
  return inv;
}

/** YaRN's magnitude factor m(s, k) = 0.1·k·ln s + 1, or 1 for s ≤ 1 (DeepSeek's `yarn_get_mscale`). */
function yarnMscale(scale: number, k: number): number {
  return scale <= 1 ? 1 : 0.1 * k * Math.log(scale) + 1;
}

/**
 * The factor RoPE's cos and sin tables carry: m(factor, mscale) / m(factor, mscaleAllDim) for YaRN
 * scaling (1 for DeepSeek-V2/V3's configs, where the two are equal), 1 otherwise.
 */
export function yarnAttentionFactor(rope: RopeConfig): number {
  const s = rope.scaling;
  return s?.type === 'yarn' ? yarnMscale(s.factor, s.mscale) / yarnMscale(s.factor, s.mscaleAllDim) : 1;
}

/** Positions as an explicit list, or `count` consecutive positions from `start`. */
export type Positions = { start: number; count: number } | Int32Array | number[];

function positionList(p: Positions): ArrayLike<number> {
  if ('start' in p && !Array.isArray(p) && !(p instanceof Int32Array)) {
    const out = new Int32Array(p.count);
    for (let i = 0; i < p.count; i++) out[i] = p.start + i;
    return out;
  }
  return p as ArrayLike<number>;
}

/** Host tables of recent long position ranges (key rope|d|start|count): a 32K-token table is 4M trig calls. */
const tableMemo: { key: string; cos: Float32Array; sin: Float32Array }[] = [];
const TABLE_MEMO_ENTRIES = 4;
/** Ranges shorter than this are computed every time (decode steps: a handful of positions). */
const TABLE_MEMO_MIN = 256;

/**
 * cos/sin of p·θ_i for every position p and frequency i (times {@link yarnAttentionFactor}), [T, d/2] float64 each (row-major): the one
 * computation of kvpack's RoPE tables ({@link ropeTableData} rounds it to float32; float64 references
 * and the host sparse-index build use it as it is). Not cached.
 */
export function ropeTableData64(rope: RopeConfig, headDim: number, positions: Positions): { cos: Float64Array; sin: Float64Array } {
  const pos = positionList(positions);
  const inv = ropeInverseFrequencies(rope, headDim);
  const half = headDim / 2;
  const m = yarnAttentionFactor(rope);
  const c = new Float64Array(pos.length * half);
  const s = new Float64Array(pos.length * half);
  for (let t = 0; t < pos.length; t++) {
    for (let i = 0; i < half; i++) {
      const a = pos[t] * inv[i];
      c[t * half + i] = m * Math.cos(a);
      s[t * half + i] = m * Math.sin(a);
    }
  }
  return { cos: c, sin: s };
}

/**
 * cos/sin of p·θ_i for every position p and frequency i, [T, d/2] float32 each (row-major), computed
 * in float64 on the host ({@link ropeTableData64}) and rounded. The last few long `{ start, count }` ranges are kept on the host (the same
 * arrays are returned again: do not modify them).
 */
export function ropeTableData(rope: RopeConfig, headDim: number, positions: Positions): { cos: Float32Array; sin: Float32Array } {
  const pos = positionList(positions);
  const ranged = 'start' in positions && !Array.isArray(positions) && !(positions instanceof Int32Array);
  const key = ranged && pos.length >= TABLE_MEMO_MIN ? `${JSON.stringify(rope)}|${headDim}|${pos[0]}|${pos.length}` : null;
  const hit = key ? tableMemo.find((e) => e.key === key) : undefined;
  if (hit) return hit;
  const t64 = ropeTableData64(rope, headDim, positions);
  const c = Float32Array.from(t64.cos);
  const s = Float32Array.from(t64.sin);
  if (key) {
    tableMemo.push({ key, cos: c, sin: s });
    if (tableMemo.length > TABLE_MEMO_ENTRIES) tableMemo.shift();
  }
  return { cos: c, sin: s };
}

/**
 * cos/sin tables, each [T, d/2] float32, computed in float64 on the host for the given positions
 * ({@link ropeTableData}).
 */
export function ropeTables(rope: RopeConfig, headDim: number, positions: Positions): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
  // Backends other than wasm (which copies into its heap) may keep the array they are given and hand it
  // out from dataSync: callers get copies, so none can modify the cached table.
  return tablesOf(rope, headDim, positions, tf.getBackend() !== 'wasm');
}

/** The tables as tensors over the cached arrays (`copy` false: only for tensors that never leave kvpack's own ops). */
function tablesOf(rope: RopeConfig, headDim: number, positions: Positions, copy: boolean): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
  const { cos, sin } = ropeTableData(rope, headDim, positions);
  const T = cos.length / (headDim / 2);
  const own = (a: Float32Array) => (copy ? a.slice() : a);
  return { cos: tf.tensor2d(own(cos), [T, headDim / 2]), sin: tf.tensor2d(own(sin), [T, headDim / 2]) };
}

/**
 * Applies RoPE to x of shape [T, H, d] (keys or queries) at the given positions; returns [T, H, d].
 * `inverse` rotates the other way (post-RoPE → pre-RoPE).
 * @throws KvpackError('shape') when T disagrees with the positions or d is odd.
 */
export function applyRope(x: tf.Tensor3D, rope: RopeConfig, positions: Positions, inverse = false): tf.Tensor3D {
  const [T, H, d] = x.shape;
  const pos = positionList(positions);
  check(pos.length === T, 'shape', `applyRope: ${pos.length} positions for ${T} tokens`);
  if (isWebGpuBackend() && x.dtype === 'float32' && T > 0) return ropeOnDevice(x, rope, positions, inverse);
  return tf.tidy(() => {
    const { cos, sin } = tablesOf(rope, d, positions, false); // internal to this tidy: no copy needed
    const c = cos.reshape([T, 1, d / 2]);
    const s = inverse ? sin.neg().reshape([T, 1, d / 2]) : sin.reshape([T, 1, d / 2]);
    if (rope.layout === 'half') {
      const [x1, x2] = tf.split(x, 2, 2);
      return tf.concat([x1.mul(c).sub(x2.mul(s)), x2.mul(c).add(x1.mul(s))], 2) as tf.Tensor3D;
    }
    const pairs = x.reshape([T, H, d / 2, 2]);
    const [a, b] = tf.split(pairs, 2, 3);
    const a3 = a.reshape([T, H, d / 2]);
    const b3 = b.reshape([T, H, d / 2]);
    const o0 = a3.mul(c).sub(b3.mul(s));
    const o1 = a3.mul(s).add(b3.mul(c));
    return tf.stack([o0, o1], 3).reshape([T, H, d]) as tf.Tensor3D;
  });
}

/**
 * {@link applyRope} on webgpu in one WGSL kernel, bit for bit the tfjs ops' result: each product and
 * sum rounded on its own as separate kernels round them (`keep` hides each product from the shader
 * compiler, so none is contracted into a fused multiply–add). Tables of a range of at least
 * {@link SHARED_ROPE_MIN_TOKENS} positions come from the shared device tables (uploaded once).
 */
function ropeOnDevice(x: tf.Tensor3D, rope: RopeConfig, positions: Positions, inverse: boolean): tf.Tensor3D {
  const [T, H, d] = x.shape;
  const range = 'start' in positions && !Array.isArray(positions) && !(positions instanceof Int32Array) ? positions : null;
  const upload = () => {
    const t = tablesOf(rope, d, positions, true);
    return [t.cos, t.sin] as [tf.Tensor2D, tf.Tensor2D];
  };
  const shared = range !== null && T >= SHARED_ROPE_MIN_TOKENS;
  const [cos, sin] = shared ? sharedRopeTensors(`half|${JSON.stringify(rope)}|${d}|${range.start}|${range.count}`, upload) : upload();
  const half = d / 2;
  const n = T * H * d;
  // Element (t, h, i): its partner j and whether it is the first of the pair; frequency f = pair index.
  const pair =
    rope.layout === 'half'
      ? `let first = i < ${half}u; let f = select(i - ${half}u, i, first); let j = select(i - ${half}u, i + ${half}u, first);`
      : `let first = (i & 1u) == 0u; let f = i >> 1u; let j = i ^ 1u;`;
  try {
    return runFlatWgsl({
      key: `rope_${rope.layout === 'half' ? 'half' : 'pairs'}_${H}_${d}_${inverse ? 'inv' : 'fwd'}`,
      names: ['x', 'c', 's'],
      inputs: [x, cos, sin],
      outputShape: [T, H, d],
      dtype: 'float32',
      invocations: n,
      code: `var<private> keepZero: u32;
fn keep(v: f32) -> f32 { return bitcast<f32>(bitcast<u32>(v) + keepZero); }
fn kernel(index: i32) {
  ${wgslFlatIndex('flat')}
  keepZero = u32(uniforms.cShape[1]) >> 31u; // 0, unknown to the compiler
  let n = u32(uniforms.outShape[0]) * ${H * d}u;
  if (u32(flat) >= n) { return; }
  let e = u32(flat);
  let row = e / ${d}u;
  let t = row / ${H}u;
  let i = e - row * ${d}u;
  ${pair}
  let cv = c[t * ${half}u + f];
  let sv = ${inverse ? '-' : ''}s[t * ${half}u + f];
  let a = x[e];
  let b = x[row * ${d}u + j];
  // first: a·c − b·s; second: b·s + a·c (the tfjs ops' order: x2·c + x1·s, a·s + b·c).
  result[flat] = select(keep(b * sv) + keep(a * cv), keep(a * cv) - keep(b * sv), first);
}`,
    }) as tf.Tensor3D;
  } finally {
    if (!shared) tf.dispose([cos, sin]);
  }
}

/**
 * One process-wide set of RoPE tables on the device (webgpu, webgl, tensorflow), keyed by what they
 * hold (e.g. `full|rope|d|start|count`): like the model's weights, a working set shared by every cache
 * and layer that decodes over the same positions — not part of any cache (a cache holds only its stored
 * form). Uploaded once instead of per call (a 32K-token full-width table pair is 32 MiB). Bounded to
 * {@link SHARED_ROPE_ENTRIES} entries (least recently used evicted); {@link sharedRopeTableBytes} says
 * what it holds, {@link releaseSharedRopeTables} frees it.
 */
interface SharedRopeEntry {
  key: string;
  backend: string;
  tensors: tf.Tensor[];
  bytes: number;
}
const sharedRope: SharedRopeEntry[] = [];
/** Entries of the shared device table cache (a few position ranges in use at once). */
export const SHARED_ROPE_ENTRIES = 4;
/**
 * Ranges shorter than this are uploaded per call instead (a few KiB: a decode step's positions, small
 * caches), as core's host table memo.
 */
export const SHARED_ROPE_MIN_TOKENS = TABLE_MEMO_MIN;

function dropShared(i: number): void {
  const [e] = sharedRope.splice(i, 1);
  for (const t of e.tensors) if (!t.isDisposed) t.dispose();
}

/**
 * The shared device tensors under `key`, made by `make` (host arrays uploaded once) on first use or
 * after eviction. The returned tensors belong to the shared cache: never dispose them (tf.tidy leaves
 * them alone); they stay valid until {@link SHARED_ROPE_ENTRIES} other keys were used after them, so use
 * them within the call that asked for them.
 */
export function sharedRopeTensors<T extends tf.Tensor[]>(key: string, make: () => T): T {
  const backend = tf.getBackend();
  for (let i = sharedRope.length - 1; i >= 0; i--) {
    const e = sharedRope[i];
    if (e.backend !== backend || e.tensors.some((t) => t.isDisposed)) {
      if (e.tensors.some((t) => t.isDisposed)) dropShared(i); // freed from outside (tf.disposeVariables, engine reset)
      continue;
    }
    if (e.key === key) {
      sharedRope.splice(i, 1);
      sharedRope.push(e); // most recently used last
      return e.tensors as T;
    }
  }
  const tensors = make();
  for (const t of tensors) tf.keep(t);
  sharedRope.push({ key, backend, tensors, bytes: tensors.reduce((a, t) => a + t.size * 4, 0) });
  const onBackend = sharedRope.filter((e) => e.backend === backend);
  if (onBackend.length > SHARED_ROPE_ENTRIES) dropShared(sharedRope.indexOf(onBackend[0]));
  return tensors;
}

/**
 * Bytes of the shared device RoPE tables ({@link sharedRopeTensors}) on the current backend: a
 * process-wide working set, which resident-byte accounting of a cache (conformance `residentRatios`)
 * subtracts.
 */
export function sharedRopeTableBytes(): number {
  const backend = tf.getBackend();
  return sharedRope.filter((e) => e.backend === backend && !e.tensors.some((t) => t.isDisposed)).reduce((a, e) => a + e.bytes, 0);
}

/** Frees every shared device RoPE table (they are rebuilt on next use). */
export function releaseSharedRopeTables(): void {
  while (sharedRope.length) dropShared(sharedRope.length - 1);
}
