import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { loadLlama2cCheckpoint, parseLlama2cCheckpoint, readLlama2cHeader } from './index.js';
import { LlamaModel } from '../model/index.js';
import type { LlamaWeights } from '../types.js';
import {
  HAVE_STORIES,
  SKIP_STORIES,
  STORIES_BIN,
  maxAbsDiff,
  randomModel,
  readStoriesRef,
  refForward,
  writeLlama2c,
  type RandomSpec,
} from '../model/reference.testutil.js';

let tmp: string;
beforeAll(async () => {
  await selectBackend('wasm');
  tmp = mkdtempSync(join(tmpdir(), 'kvpack-llama2c-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Expects a KvpackError of `code` whose message contains every fragment. */
async function expectError(p: Promise<unknown> | (() => unknown), code: string, ...fragments: string[]) {
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err, `expected KvpackError('${code}')`).toBeInstanceOf(KvpackError);
  expect((err as KvpackError).code).toBe(code);
  for (const f of fragments) expect((err as Error).message).toContain(f);
}

const data = (t: tf.Tensor) => t.dataSync() as Float32Array;

/** [out, in] row-major float64 → the [in, out] float32 values a loader must produce. */
function transposed(w: Float64Array, out: number, inp: number): Float32Array {
  const r = new Float32Array(w.length);
  for (let o = 0; o < out; o++) for (let i = 0; i < inp; i++) r[i * out + o] = w[o * inp + i];
  return r;
}

function disposeWeights(w: LlamaWeights) {
  new LlamaModel(w).dispose();
}

describe.skipIf(!HAVE_STORIES)(`stories260K Q8_0 checkpoint${SKIP_STORIES}`, () => {
  it('loads with the config of PROVENANCE.md', async () => {
    const h = readLlama2cHeader(readFileSync(STORIES_BIN), STORIES_BIN);
    expect(h).toMatchObject({ version: 2, dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, vocabSize: 512, maxSeqLen: 512, sharedClassifier: true, groupSize: 32 });
    const w = await loadLlama2cCheckpoint(STORIES_BIN);
    expect(w.config).toMatchObject({
      dim: 64,
      hiddenDim: 172,
      nLayers: 5,
      nHeads: 8,
      nKvHeads: 4,
      headDim: 8,
      vocabSize: 512,
      maxSeqLen: 512,
      normEps: 1e-5,
      rope: { theta: 10000, layout: 'interleaved' },
      tiedEmbeddings: true,
      qkvBias: false,
      bosId: 1,
      eosId: 2,
    });
    expect(w.layers).toHaveLength(5);
    expect(w.embedding.shape).toEqual([512, 64]);
    expect(w.classifier.shape).toEqual([64, 512]);
    expect(w.layers[0].wq.shape).toEqual([64, 64]);
    expect(w.layers[0].wk.shape).toEqual([64, 32]);
    expect(w.layers[0].wo.shape).toEqual([64, 64]);
    expect(w.layers[0].w1.shape).toEqual([64, 172]);
    expect(w.layers[0].w2.shape).toEqual([172, 64]);

    // Against a stand-alone float64 dequantization of the documented layout: every table, bit-exact
    // after rounding to float32, and matrices transposed to [in, out].
    const ref = readStoriesRef(readFileSync(STORIES_BIN));
    expect(Array.from(data(w.embedding))).toEqual(Array.from(Float32Array.from(ref.emb)));
    expect(Array.from(data(w.classifier))).toEqual(Array.from(transposed(ref.emb, 512, 64)));
    expect(Array.from(data(w.finalNorm))).toEqual(Array.from(Float32Array.from(ref.finalNorm)));
    for (const l of [0, 4]) {
      const R = ref.layers[l];
      const W = w.layers[l];
      expect(Array.from(data(W.attnNorm))).toEqual(Array.from(Float32Array.from(R.attnNorm)));
      expect(Array.from(data(W.ffnNorm))).toEqual(Array.from(Float32Array.from(R.ffnNorm)));
      expect(Array.from(data(W.wq))).toEqual(Array.from(transposed(R.wq, 64, 64)));
      expect(Array.from(data(W.wk))).toEqual(Array.from(transposed(R.wk, 32, 64)));
      expect(Array.from(data(W.wv))).toEqual(Array.from(transposed(R.wv, 32, 64)));
      expect(Array.from(data(W.wo))).toEqual(Array.from(transposed(R.wo, 64, 64)));
      expect(Array.from(data(W.w1))).toEqual(Array.from(transposed(R.w1, 172, 64)));
      expect(Array.from(data(W.w2))).toEqual(Array.from(transposed(R.w2, 64, 172)));
      expect(Array.from(data(W.w3))).toEqual(Array.from(transposed(R.w3, 172, 64)));
    }
    disposeWeights(w);
  });

  it('rejects a truncated file, trailing bytes and a corrupt magic, naming the file', async () => {
    const bytes = readFileSync(STORIES_BIN);
    const cut = join(tmp, 'cut_q80.bin');
    writeFileSync(cut, bytes.subarray(0, bytes.length - 10));
    await expectError(loadLlama2cCheckpoint(cut), 'truncated', cut, `expected ${bytes.length} bytes, found ${bytes.length - 10}`);
    const headerOnly = join(tmp, 'header_only.bin');
    writeFileSync(headerOnly, bytes.subarray(0, 100));
    await expectError(loadLlama2cCheckpoint(headerOnly), 'truncated', headerOnly, 'expected 256 bytes, found 100');
    const long = join(tmp, 'long_q80.bin');
    writeFileSync(long, Buffer.concat([bytes, Buffer.alloc(7)]));
    await expectError(loadLlama2cCheckpoint(long), 'corrupt', long, `should be ${bytes.length} bytes`, '7 unexpected trailing bytes');
    const bad = Buffer.from(bytes);
    bad[0] ^= 0xff;
    const badMagic = join(tmp, 'bad_magic.bin');
    writeFileSync(badMagic, bad);
    await expectError(loadLlama2cCheckpoint(badMagic), 'corrupt', badMagic, 'not a llama2.c checkpoint', '"ak42" magic');
    const v9 = Buffer.from(bytes);
    v9.writeInt32LE(9, 4);
    await expectError(() => parseLlama2cCheckpoint(v9, 'v9.bin'), 'corrupt', 'v9.bin', 'version 9 is not supported');
    await expectError(loadLlama2cCheckpoint(join(tmp, 'missing.bin')), 'io', 'missing.bin');
  });

  it('rejects inconsistent header values', async () => {
    const bytes = readFileSync(STORIES_BIN);
    const patch = (offset: number, value: number) => {
      const b = Buffer.from(bytes);
      b.writeInt32LE(value, offset);
      return b;
    };
    await expectError(() => parseLlama2cCheckpoint(patch(20, 3), 'h.bin'), 'corrupt', 'h.bin', 'dim = 64 is not a multiple of n_heads = 3');
    await expectError(() => parseLlama2cCheckpoint(patch(24, 3), 'h.bin'), 'corrupt', 'n_heads = 8 is not a multiple of n_kv_heads = 3');
    await expectError(() => parseLlama2cCheckpoint(patch(16, 0), 'h.bin'), 'corrupt', 'n_layers = 0 must be a positive integer');
    await expectError(() => parseLlama2cCheckpoint(patch(28, -512), 'h.bin'), 'corrupt', 'vocab_size = -512');
    await expectError(() => parseLlama2cCheckpoint(patch(37, 0), 'h.bin'), 'corrupt', 'group_size = 0');
    await expectError(() => parseLlama2cCheckpoint(patch(37, 48), 'h.bin'), 'corrupt', 'not a multiple of group_size = 48');
    // A header describing a bigger model than the file holds is a truncated file.
    await expectError(() => parseLlama2cCheckpoint(patch(16, 6), 'h.bin'), 'truncated', 'h.bin', 'expected');
  });
});

describe('llama2.c versions 0, 1, 2 on a random model', () => {
  const spec: RandomSpec = { dim: 16, hidden: 24, nLayers: 2, nHeads: 4, nKvHeads: 2, vocab: 40, maxSeqLen: 12, shared: false, groupSize: 8, seed: 11 };
  const ids = [1, 7, 39, 0, 22, 22, 5];

  for (const shared of [false, true]) {
    it(`versions 0, 1, 2 load identical weights and match a float64 forward (${shared ? 'shared' : 'unshared'} classifier)`, async () => {
      const { ref, tables } = randomModel({ ...spec, shared, seed: shared ? 12 : 11 });
      const expected = refForward(ref, ids).logits;
      const loaded: LlamaWeights[] = [];
      for (const version of [0, 1, 2] as const) {
        const file = join(tmp, `rand_v${version}_${shared}.bin`);
        writeFileSync(file, writeLlama2c(ref, tables, version, spec.groupSize));
        const w = await loadLlama2cCheckpoint(file);
        expect(w.config).toMatchObject({ dim: 16, hiddenDim: 24, nLayers: 2, nHeads: 4, nKvHeads: 2, headDim: 4, vocabSize: 40, maxSeqLen: 12, tiedEmbeddings: shared });
        loaded.push(w);
      }
      // The three files hold the same (exactly representable) values: the tensors are bit-identical.
      const flat = (w: LlamaWeights) => [w.embedding, w.classifier, w.finalNorm, ...w.layers.flatMap((l) => Object.values(l) as tf.Tensor[])].map((t) => Array.from(data(t)));
      expect(flat(loaded[1])).toEqual(flat(loaded[0]));
      expect(flat(loaded[2])).toEqual(flat(loaded[0]));
      expect(Array.from(data(loaded[0].classifier))).toEqual(Array.from(transposed(ref.cls, 40, 16)));
      for (const w of loaded) {
        const model = new LlamaModel(w);
        const { logits, cache } = await model.prefill(ids);
        const got = data(logits);
        const err = Math.max(...expected.map((row, t) => maxAbsDiff(got.subarray(t * 40, (t + 1) * 40), row)));
        expect(err).toBeLessThan(1e-4);
        tf.dispose([logits, ...cache.keys, ...cache.values]);
        model.dispose();
      }
    });
  }

  it('reports a truncated or padded version-0 file with expected and found sizes', async () => {
    const { ref, tables } = randomModel(spec);
    const bytes = writeLlama2c(ref, tables, 0, spec.groupSize);
    await expectError(() => parseLlama2cCheckpoint(bytes.subarray(0, bytes.length - 4), 'v0.bin'), 'truncated', 'v0.bin', 'version-0', `expected ${bytes.length} bytes, found ${bytes.length - 4}`);
    await expectError(() => parseLlama2cCheckpoint(Buffer.concat([bytes, Buffer.alloc(4)]), 'v0.bin'), 'corrupt', 'v0.bin', '4 unexpected trailing bytes');
    await expectError(() => parseLlama2cCheckpoint(bytes.subarray(0, 20), 'tiny.bin'), 'truncated', 'tiny.bin', '20 bytes');
  });

  it('dispose frees every tensor the loader created', async () => {
    const start = tf.memory().numTensors;
    const { ref, tables } = randomModel(spec);
    const good = writeLlama2c(ref, tables, 1, spec.groupSize);
    const w = parseLlama2cCheckpoint(good, 'good.bin');
    expect(tf.memory().numTensors).toBeGreaterThan(start);
    disposeWeights(w);
    expect(tf.memory().numTensors).toBe(start);
  });
});
