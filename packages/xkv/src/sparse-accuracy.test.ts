import * as tf from '@tensorflow/tfjs-core';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStrategy, selectBackend, type CompressedCache, type KVCache, type Strategy } from '@kvpack/core';
import { LlamaModel, loadLlama2cCheckpoint } from '@kvpack/models';
import './index.js';
import { storiesPaths } from './test-utils.js';

/**
 * Sparse decode (xKV-SR) against full reconstruction on stories260K, through the model runner
 * (`LlamaModel.nll` / `generate`, whose decode() calls the cache's `attend`): prompt = the oracle's
 * greedy sequence, first T = 256 tokens; continuation = the next 64 greedy tokens of the dense model.
 */
const S = storiesPaths();

/** A strategy whose caches count attend() calls, or hide attend() (the runner then reconstructs keys/values). */
function wrap(inner: Strategy, mode: 'count' | 'hide', counter: { calls: number }): Strategy {
  const proxy = (c: CompressedCache): CompressedCache =>
    new Proxy(c, {
      get(target, prop) {
        if (prop === 'attend') {
          if (mode === 'hide') return undefined;
          return (l: number, q: tf.Tensor3D, o?: { causalTail?: number }) => {
            counter.calls++;
            return target.attend!(l, q, o);
          };
        }
        const v = Reflect.get(target, prop, target);
        return typeof v === 'function' ? v.bind(target) : v;
      },
    });
  return { ...inner, compress: (async (cache: KVCache) => proxy(await inner.compress(cache))) as Strategy['compress'] };
}

describe.skipIf(!S.have)(`xkv sparse decode on stories260K${S.skip}`, () => {
  let model: LlamaModel;
  let prompt: number[];
  let cont: number[];
  const xkv = (o: Record<string, unknown> = {}) => createStrategy({ name: 'xkv', options: { layersPerGroup: 4, ...o } });
  // Budget 64 at T = 256: 8 of C = (256 − 16) / 8 = 30 chunks rebuilt per KV head, plus 2 exact outlier chunks and 16 exact local tokens.
  const sparse64 = { decode: 'sparse', sparse: { budget: 64, chunkSize: 8, outlierChunks: 2, localTokens: 16 } };
  const sparseAll = { decode: 'sparse', sparse: { budget: 256, chunkSize: 8, outlierChunks: 2, localTokens: 16 } };

  beforeAll(async () => {
    await selectBackend('wasm');
    const o = JSON.parse(readFileSync(S.oracle, 'utf8'));
    model = new LlamaModel(await loadLlama2cCheckpoint(S.bin));
    prompt = o.greedy_ids.slice(0, 256);
    cont = (await model.generate(prompt, { maxNewTokens: 64 })).ids; // dense, greedy
  });
  afterAll(() => model?.dispose());

  it('the runner decodes through attend(); with a budget covering every chunk, sparse NLL equals core attention over keys()/values()', async () => {
    const counter = { calls: 0 };
    const viaAttend = await model.nll(prompt, cont, wrap(xkv(sparseAll), 'count', counter));
    expect(counter.calls).toBe(5); // one decode call of n = 63 teacher-forced tokens × 5 layers
    const viaKeys = await model.nll(prompt, cont, wrap(xkv(sparseAll), 'hide', counter));
    expect(Math.abs(viaAttend - viaKeys)).toBeLessThan(1e-4);
    const fullAttend = await model.nll(prompt, cont, xkv());
    const fullKeys = await model.nll(prompt, cont, wrap(xkv(), 'hide', counter));
    expect(Math.abs(fullAttend - fullKeys)).toBeLessThan(1e-4);
  });

  it('reports NLL and greedy agreement of sparse (budget 64) vs full reconstruction vs dense', async () => {
    const dense = await model.nll(prompt, cont);
    const full = await model.nll(prompt, cont, xkv());
    const sp = await model.nll(prompt, cont, xkv(sparse64));
    const genFull = await model.generate(prompt, { maxNewTokens: 64, strategy: xkv() });
    const gFull = genFull.ids;
    const gSparse = await model.generate(prompt, { maxNewTokens: 64, strategy: xkv(sparse64) });
    const agree = (a: number[], b: number[]) => a.filter((t, i) => t === b[i]).length;
    const firstDiff = (a: number[], b: number[]) => {
      const i = a.findIndex((t, j) => t !== b[j]);
      return i < 0 ? a.length : i;
    };
    console.log(
      `stories260K T=256, 64 continuation tokens: mean NLL dense ${dense.toFixed(4)}, xkv full ${full.toFixed(4)}, xkv sparse budget 64 ${sp.toFixed(4)} (nats/token); ` +
        `greedy agreement with dense: full ${agree(gFull, cont)}/64 (first difference at ${firstDiff(gFull, cont)}), ` +
        `sparse ${agree(gSparse.ids, cont)}/64 (first difference at ${firstDiff(gSparse.ids, cont)}); sparse vs full ${agree(gSparse.ids, gFull)}/64; ` +
        `measured compression ratio: full ${genFull.cache.compressionRatio.toFixed(2)}, sparse ${gSparse.cache.compressionRatio.toFixed(2)} (landmarks and exact rows included)`,
    );
    for (const v of [dense, full, sp]) expect(Number.isFinite(v)).toBe(true);
    // A regression guard, not a derived bound: 64 of 256 tokens rebuilt must not cost more than 0.5 nats/token over full reconstruction.
    expect(sp - full).toBeLessThan(0.5);
  });
});
