import { copyFileSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { MODELS_DIR, tinyCheckpoint, writeHfDir } from './hf/testutil.js';
import { disposeLlamaWeights } from './hf/weights.js';
import { encodeGguf, f32Bytes } from './gguf/testutil.js';
import { detectModelFormat, loadModel, loadTokenizer } from './load.js';

let dir: string;
beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-load-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const STORIES = join(MODELS_DIR, 'stories260K');
const haveStories = existsSync(join(STORIES, 'stories260K_q80.bin')) && existsSync(join(STORIES, 'tok512.bin'));

describe('loadModel / loadTokenizer', () => {
  it('detects and loads a Hugging Face directory and a GGUF file', async () => {
    const ck = tinyCheckpoint({ dim: 32, hiddenDim: 64, nLayers: 1, nHeads: 2, nKvHeads: 1, vocabSize: 20 }, 4);
    const hf = join(dir, 'hf');
    writeHfDir(hf, ck);
    expect(await detectModelFormat(hf)).toEqual({ format: 'hf', path: hf });
    expect(await detectModelFormat(join(hf, 'config.json'))).toEqual({ format: 'hf', path: hf });
    const start = tf.memory().numTensors;
    const a = await loadModel(hf);
    expect(a.format).toBe('hf');
    expect(a.tokenizer).toBeUndefined();
    expect(a.weights.config).toMatchObject({ dim: 32, nLayers: 1, rope: { layout: 'half' } });

    const tensors = [...ck.tensors].map(([name, t]) => {
      const g = name
        .replace('model.embed_tokens.weight', 'token_embd.weight')
        .replace('model.norm.weight', 'output_norm.weight')
        .replace('lm_head.weight', 'output.weight')
        .replace(/^model\.layers\.(\d+)\./, 'blk.$1.')
        .replace('input_layernorm', 'attn_norm')
        .replace('post_attention_layernorm', 'ffn_norm')
        .replace('self_attn.q_proj', 'attn_q')
        .replace('self_attn.k_proj', 'attn_k')
        .replace('self_attn.v_proj', 'attn_v')
        .replace('self_attn.o_proj', 'attn_output')
        .replace('mlp.gate_proj', 'ffn_gate')
        .replace('mlp.up_proj', 'ffn_up')
        .replace('mlp.down_proj', 'ffn_down');
      return { name: g, ne: [...t.shape].reverse(), type: 0, data: f32Bytes(t.data) };
    });
    const tokens = ['<unk>', '<s>', '</s>', '▁', ...'abcdefghijklmnop'];
    const file = join(dir, 'm.gguf');
    writeFileSync(
      file,
      encodeGguf(
        [
          { key: 'general.architecture', type: 'string', value: 'llama' },
          { key: 'llama.embedding_length', type: 'u32', value: 32 },
          { key: 'llama.block_count', type: 'u32', value: 1 },
          { key: 'llama.feed_forward_length', type: 'u32', value: 64 },
          { key: 'llama.attention.head_count', type: 'u32', value: 2 },
          { key: 'llama.attention.head_count_kv', type: 'u32', value: 1 },
          { key: 'tokenizer.ggml.model', type: 'string', value: 'llama' },
          { key: 'tokenizer.ggml.tokens', type: 'strings', value: tokens },
          { key: 'tokenizer.ggml.scores', type: 'f32s', value: tokens.map(() => 0) },
        ],
        tensors,
      ),
    );
    expect((await detectModelFormat(file)).format).toBe('gguf');
    const b = await loadModel(file);
    expect(b.format).toBe('gguf');
    expect(b.weights.config.rope.layout).toBe('interleaved');
    expect(b.tokenizer!.encode('ab c')).toEqual([3, 4, 5, 3, 6]);
    expect((await loadTokenizer(file)).encode('p')).toEqual([3, 19]);
    disposeLlamaWeights(a.weights);
    disposeLlamaWeights(b.weights);
    expect(tf.memory().numTensors).toBe(start);
  });

  it.skipIf(!haveStories)(`detects llama2.c checkpoints and finds tok{vocab}.bin beside them${haveStories ? '' : ` (skipped: ${STORIES} is absent)`}`, async () => {
    const ckpt = join(STORIES, 'stories260K_q80.bin');
    expect((await detectModelFormat(ckpt)).format).toBe('llama2c');
    const m = await loadModel(ckpt);
    expect(m.format).toBe('llama2c');
    expect(m.weights.config).toMatchObject({ dim: 64, nLayers: 5, nHeads: 8, nKvHeads: 4, vocabSize: 512, rope: { layout: 'interleaved' } });
    expect(m.tokenizer!.vocabSize).toBe(512);
    expect(m.tokenizer!.decode(m.tokenizer!.encode('Once upon a time')).trimStart()).toBe('Once upon a time');
    disposeLlamaWeights(m.weights);
    const tok = await loadTokenizer(join(STORIES, 'tok512.bin'), { vocabSize: 512 });
    expect(tok.vocabSize).toBe(512);
    // Without a tokenizer beside it, a checkpoint still loads (no tokenizer).
    const lone = join(dir, 'lone.bin');
    copyFileSync(ckpt, lone);
    const n = await loadModel(lone);
    expect(n.tokenizer).toBeUndefined();
    disposeLlamaWeights(n.weights);
  });

  it('rejects unknown formats and missing paths', async () => {
    const f = join(dir, 'x.txt');
    writeFileSync(f, 'hello world');
    const e1 = await loadModel(f).catch((e) => e);
    expect(e1).toBeInstanceOf(KvpackError);
    expect(e1.code).toBe('unsupported');
    expect(e1.message).toContain('x.txt: unknown model format');
    const e2 = await loadModel(join(dir, 'nope')).catch((e) => e);
    expect(e2).toBeInstanceOf(KvpackError);
    expect(e2.code).toBe('io');
    const e3 = await loadModel(dir).catch((e) => e);
    expect(e3.code).toBe('unsupported');
    expect(e3.message).toContain('without config.json');
  });
});
