import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, selectBackend, type KVCache } from '@kvpack/core';
import '@kvpack/baselines';
import { writeKVDump } from '@kvpack/models';
import { attentionOutputError } from './attention-error.js';
import { kvDumpAttentionErrors } from './kvdump.js';

const layout = { nLayers: 3, nHeads: 4, nKvHeads: 2, headDim: 8 };
const T = 20;

function cache(withQueries: boolean): KVCache {
  let s = 11;
  const r = (shape: [number, number, number]) => tf.randomNormal(shape, 0, 1, 'float32', s++) as tf.Tensor3D;
  return {
    layout,
    rope: { theta: 10000, layout: 'half', scaling: null },
    keys: Array.from({ length: 3 }, () => r([T, 2, 8])),
    values: Array.from({ length: 3 }, () => r([T, 2, 8])),
    ...(withQueries ? { queries: Array.from({ length: 3 }, () => r([5, 4, 8])) } : {}),
  };
}
const free = (c: KVCache) => tf.dispose([...c.keys, ...c.values, ...(c.queries ?? [])]);

beforeAll(async () => {
  await selectBackend('wasm');
});

describe('attention-output error on a KV dump', () => {
  it("uses the dump's queries: equal to the in-memory computation, 0 for an exact cache", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-dump-'));
    const file = join(dir, 'cache.safetensors');
    const c = cache(true);
    await writeKVDump(file, c, { keys: 'post' });
    const start = tf.memory().numTensors;
    const res = await kvDumpAttentionErrors(file, [{ name: 'dense', options: { storage: 'float32' } }, { name: 'quant', options: { bits: 4 } }]);
    expect(tf.memory().numTensors).toBe(start);
    expect(res[0].error.pooled).toBeLessThan(1e-5); // post-RoPE keys were un-rotated on read: float32 rounding only
    expect(res[0].ratio).toBe(0.5);
    const q = await createStrategy({ name: 'quant', options: { bits: 4 } }).compress(c);
    const direct = await attentionOutputError(c, q);
    expect(res[1].error.queries).toBe(5);
    expect(res[1].error.pooled).toBeGreaterThan(1e-3);
    expect(res[1].error.pooled).toBeCloseTo(direct.pooled, 3);
    // int4 symmetric, one group of d = 8 channels per token per KV head: per layer and per keys /
    // values ⌈T·H_kv·d·4/8⌉ code bytes + a 2-byte scale per token per head; dense is float16.
    const quantBytes = 3 * 2 * (Math.ceil((T * 2 * 8 * 4) / 8) + 2 * T * 2);
    expect(q.byteSize()).toBe(quantBytes);
    expect(res[1].ratio).toBe((3 * 2 * T * 2 * 8 * 2) / quantBytes);
    q.dispose();
    free(c);
  });

  it('a dump without queries is a clear error naming the file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-dump-'));
    const file = join(dir, 'noq.safetensors');
    const c = cache(false);
    await writeKVDump(file, c);
    free(c);
    await expect(kvDumpAttentionErrors(file, [{ name: 'dense' }])).rejects.toThrow(/^noq\.safetensors: the KV dump has no "layers\.\{i\}\.queries" tensors/);
  });
});
