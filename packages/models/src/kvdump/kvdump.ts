import * as tf from '@tensorflow/tfjs-core';
import { basename } from 'node:path';
import {
  KvpackError,
  applyRope,
  check,
  validateKVCache,
  validateLayout,
  type KVCache,
  type ModelLayout,
  type RopeConfig,
  type RopeScaling,
} from '@kvpack/core';
import { parseRopeScaling } from '../hf/config.js';
import { SafetensorsFile, writeSafetensors, type SafetensorsTensorInput } from '../hf/safetensors.js';

/**
 * KV dumps: per-layer KV caches in a safetensors file, so caches captured from a PyTorch model can
 * be benchmarked without running the model in kvpack. Tensors (any of F32/F16/BF16/F64):
 *
 * - `layers.{i}.keys_pre_rope` [T, H_kv, d] and/or `layers.{i}.keys_post_rope` [T, H_kv, d]
 * - `layers.{i}.values` [T, H_kv, d]
 * - optional `layers.{i}.queries` [T_q, H, d], post-RoPE, the last T_q prompt positions
 *
 * `__metadata__` (strings): `rope` = JSON `{theta, layout: "half"|"interleaved", scaling}` (scaling
 * in kvpack's form or Hugging Face's `rope_scaling` form, or null) — required; `layout` = JSON
 * `{nLayers, nHeads, nKvHeads, headDim}` — optional when it can be read off the tensors (nHeads
 * needs queries); `start_position` = position of token 0 (default "0").
 */
export const KV_DUMP_FORMAT = 'kvpack.kvdump';

const TENSOR_RE = /^layers\.(\d+)\.(keys_pre_rope|keys_post_rope|values|queries)$/;

/** Options of {@link writeKVDump}. */
export interface KVDumpWriteOptions {
  /** Which keys to store: pre-RoPE (default), post-RoPE (rotated at write time) or both. */
  keys?: 'pre' | 'post' | 'both';
  /** Storage dtype (default F32). */
  dtype?: 'F32' | 'F16' | 'BF16';
  /** Extra `__metadata__` entries. */
  metadata?: Record<string, string>;
}

function parseRope(raw: string | undefined, file: string): RopeConfig {
  check(raw !== undefined, 'corrupt', `${file}: __metadata__ has no "rope" entry (JSON {theta, layout, scaling})`);
  let r: Record<string, unknown>;
  try {
    r = JSON.parse(raw);
  } catch (e) {
    throw new KvpackError('corrupt', `${file}: __metadata__ "rope" is not valid JSON`, { cause: e });
  }
  check(typeof r.theta === 'number' && r.theta > 0, 'config', `${file}: rope.theta must be a positive number, got ${JSON.stringify(r.theta)}`);
  check(r.layout === 'half' || r.layout === 'interleaved', 'config', `${file}: rope.layout must be "half" or "interleaved", got ${JSON.stringify(r.layout)}`);
  let scaling: RopeScaling | null = null;
  const s = r.scaling as Record<string, unknown> | null | undefined;
  if (s && s.type === 'llama3' && 'lowFreqFactor' in s) scaling = s as unknown as RopeScaling;
  else if (s && s.type === 'linear' && !('rope_type' in s)) scaling = { type: 'linear', factor: s.factor as number };
  else scaling = parseRopeScaling(s, `${file} rope.scaling`);
  return { theta: r.theta, layout: r.layout, scaling };
}

function parseLayout(raw: string | undefined, file: string): Partial<ModelLayout> {
  if (raw === undefined) return {};
  try {
    const l = JSON.parse(raw) as Partial<ModelLayout>;
    check(l && typeof l === 'object', 'corrupt', `${file}: __metadata__ "layout" must be a JSON object`);
    return l;
  } catch (e) {
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('corrupt', `${file}: __metadata__ "layout" is not valid JSON`, { cause: e });
  }
}

/**
 * Reads a KV dump as a {@link KVCache} (pre-RoPE keys). When a layer has only post-RoPE keys they
 * are rotated back with `applyRope(…, inverse = true)` at positions start_position + t. When both
 * are present the pre-RoPE keys are used, after checking that rotating them reproduces the
 * post-RoPE keys (relative Frobenius error ≤ 2e-2, loose enough for bf16 dumps) — a mismatch
 * almost always means a wrong `rope.layout` or `theta`.
 * The caller owns (and must dispose) the returned tensors.
 * @throws KvpackError naming the file and tensor: 'corrupt' (missing values/keys, bad metadata,
 *         pre/post disagreement), 'shape' (shape mismatch), 'layout', 'nonfinite', 'unsupported' (dtype).
 */
export async function readKVDump(path: string): Promise<KVCache> {
  const file = basename(path);
  const f = await SafetensorsFile.open(path);
  const made: tf.Tensor[] = [];
  try {
    const md = f.header.metadata;
    const rope = parseRope(md.rope, file);
    const meta = parseLayout(md.layout, file);
    const startPosition = md.start_position === undefined ? 0 : Number(md.start_position);
    check(Number.isInteger(startPosition) && startPosition >= 0, 'config', `${file}: start_position must be a non-negative integer, got "${md.start_position}"`);
    const found = new Map<number, Set<string>>();
    for (const name of f.names()) {
      const m = TENSOR_RE.exec(name);
      if (!m) continue;
      const l = Number(m[1]);
      if (!found.has(l)) found.set(l, new Set());
      found.get(l)!.add(m[2]);
    }
    check(found.size > 0, 'corrupt', `${file}: no "layers.{i}.values" / "layers.{i}.keys_pre_rope" tensors (not a KV dump?)`);
    const L = meta.nLayers ?? Math.max(...found.keys()) + 1;
    for (const l of found.keys()) check(l < L, 'layout', `${file}: tensor for layer ${l} but layout.nLayers is ${L}`);
    for (let l = 0; l < L; l++) {
      const have = found.get(l) ?? new Set<string>();
      check(have.has('values'), 'corrupt', `${file}: missing tensor "layers.${l}.values"`);
      check(have.has('keys_pre_rope') || have.has('keys_post_rope'), 'corrupt', `${file}: missing tensor "layers.${l}.keys_pre_rope" (or "layers.${l}.keys_post_rope")`);
    }
    const withQ = [...found.values()].filter((s) => s.has('queries')).length;
    check(withQ === 0 || withQ === L, 'corrupt', `${file}: ${withQ} of ${L} layers have "queries"; give them for every layer or none`);

    const shape = (name: string) => f.header.tensors.get(name)!.shape;
    const first = shape(found.get(0)!.has('keys_pre_rope') ? 'layers.0.keys_pre_rope' : 'layers.0.keys_post_rope');
    check(first.length === 3, 'shape', `${file}: keys of layer 0 must be [T, H_kv, d], got [${first}]`);
    const [T, Hkv, d] = first;
    const layout: ModelLayout = {
      nLayers: L,
      nKvHeads: meta.nKvHeads ?? Hkv,
      headDim: meta.headDim ?? d,
      nHeads: meta.nHeads ?? (withQ ? shape('layers.0.queries')[1] : (undefined as unknown as number)),
    };
    check(layout.nHeads !== undefined, 'corrupt', `${file}: the number of query heads is unknown: add __metadata__ "layout" or queries`);
    validateLayout(layout);
    const want = [T, layout.nKvHeads, layout.headDim];
    const expectShape = (name: string, w: (number | null)[]) => {
      const s = shape(name);
      check(
        s.length === w.length && s.every((v, i) => w[i] === null || v === w[i]),
        'shape',
        `${file}: tensor "${name}" has shape [${s}], expected [${w.map((v, i) => (v === null ? ['T_q', 'H', 'd'][i] : v))}]`,
      );
    };
    const read = async (name: string) => {
      const t = await f.readFloat32(name);
      const x = tf.tensor3d(t.data, t.shape as [number, number, number], 'float32');
      made.push(x);
      return x;
    };
    const keys: tf.Tensor3D[] = [];
    const values: tf.Tensor3D[] = [];
    const queries: tf.Tensor3D[] = [];
    for (let l = 0; l < L; l++) {
      const have = found.get(l)!;
      const p = `layers.${l}.`;
      for (const k of ['keys_pre_rope', 'keys_post_rope', 'values'])
        if (have.has(k)) expectShape(p + k, want);
      values.push(await read(p + 'values'));
      const post = have.has('keys_post_rope') ? await read(p + 'keys_post_rope') : null;
      if (have.has('keys_pre_rope')) {
        const pre = await read(p + 'keys_pre_rope');
        if (post) {
          const err = tf.tidy(() => {
            const rot = applyRope(pre, rope, { start: startPosition, count: T });
            return tf.div(tf.norm(tf.sub(rot, post)), tf.maximum(tf.norm(post), 1e-30));
          });
          const e = (await err.data())[0];
          err.dispose();
          check(
            e <= 2e-2,
            'corrupt',
            `${file}: layer ${l} keys_post_rope disagree with keys_pre_rope rotated by the dump's RoPE (relative error ${e.toExponential(2)}); check rope.layout and rope.theta`,
          );
        }
        keys.push(pre);
      } else {
        const pre = applyRope(post!, rope, { start: startPosition, count: T }, true);
        made.push(pre);
        keys.push(pre);
      }
      if (withQ) {
        expectShape(p + 'queries', [null, layout.nHeads, layout.headDim]);
        check(shape(p + 'queries')[0] <= T, 'shape', `${file}: tensor "${p}queries" has ${shape(p + 'queries')[0]} tokens, more than the ${T} cached`);
        queries.push(await read(p + 'queries'));
      }
    }
    const cache: KVCache = { layout, rope, keys, values, startPosition, ...(withQ ? { queries } : {}) };
    await validateKVCache(cache);
    // Drop the post-RoPE tensors that were only read for checking or un-rotation.
    const keep = new Set<tf.Tensor>([...keys, ...values, ...queries]);
    tf.dispose(made.filter((t) => !keep.has(t)));
    return cache;
  } catch (e) {
    tf.dispose(made);
    throw e;
  } finally {
    await f.close();
  }
}

/**
 * Writes a {@link KVCache} as a KV dump (see {@link readKVDump}): pre-RoPE keys and/or post-RoPE
 * keys (rotated here at positions startPosition + t), values, queries when the cache has them, and
 * the layout / RoPE / start position metadata.
 * @throws KvpackError from `validateKVCache` for an invalid cache.
 */
export async function writeKVDump(path: string, cache: KVCache, options: KVDumpWriteOptions = {}): Promise<void> {
  const T = await validateKVCache(cache);
  const mode = options.keys ?? 'pre';
  const dtype = options.dtype ?? 'F32';
  const start = cache.startPosition ?? 0;
  const tensors: SafetensorsTensorInput[] = [];
  const host = (name: string, x: tf.Tensor): SafetensorsTensorInput => ({ name, shape: [...x.shape], data: x.dataSync() as Float32Array, dtype });
  for (let l = 0; l < cache.layout.nLayers; l++) {
    const p = `layers.${l}.`;
    if (mode !== 'post') tensors.push(host(p + 'keys_pre_rope', cache.keys[l]));
    if (mode !== 'pre') {
      const post = applyRope(cache.keys[l], cache.rope, { start, count: T });
      tensors.push(host(p + 'keys_post_rope', post));
      post.dispose();
    }
    tensors.push(host(p + 'values', cache.values[l]));
    if (cache.queries) tensors.push(host(p + 'queries', cache.queries[l]));
  }
  const { nLayers, nHeads, nKvHeads, headDim } = cache.layout;
  await writeSafetensors(path, tensors, {
    format: KV_DUMP_FORMAT,
    layout: JSON.stringify({ nLayers, nHeads, nKvHeads, headDim }),
    rope: JSON.stringify({ theta: cache.rope.theta, layout: cache.rope.layout, scaling: cache.rope.scaling ?? null }),
    start_position: String(start),
    ...options.metadata,
  });
}
