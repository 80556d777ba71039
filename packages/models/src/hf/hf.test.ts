import { mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { parseHfConfig } from './config.js';
import { loadHfModel, loadHfWeights } from './load.js';
import { SafetensorsFile, encodeSafetensors } from './safetensors.js';
import { HfTokenizer } from './tokenizer.js';
import { disposeLlamaWeights } from './weights.js';
import { exactRandom, rng, tinyCheckpoint, writeHfDir, type TinySpec } from './testutil.js';

let dir: string;
beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-hf-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function kvErr(p: Promise<unknown>): Promise<KvpackError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(KvpackError);
  return e as KvpackError;
}

/** float64 bits → float16 / bfloat16 patterns, written plainly (values here are exact in both). */
function f16Pattern(v: number): number {
  if (v === 0) return Object.is(v, -0) ? 0x8000 : 0;
  const s = v < 0 ? 0x8000 : 0;
  const a = Math.abs(v);
  const e = Math.floor(Math.log2(a));
  const m = a / 2 ** e - 1;
  return s | ((e + 15) << 10) | Math.round(m * 1024);
}

describe('safetensors', () => {
  it('writes the documented layout and reads F32, F16 and BF16 back to float32', async () => {
    const r = rng(3);
    const a = exactRandom(24, r, 4);
    const bytes = encodeSafetensors(
      [
        { name: 'a32', shape: [2, 3, 4], data: a },
        { name: 'a16', shape: [24], data: a, dtype: 'F16' },
        { name: 'abf', shape: [4, 6], data: a, dtype: 'BF16' },
      ],
      { note: 'hi' },
    );
    // Layout: u64 LE header length N, N bytes JSON (padded to 8), then data in order.
    const dv = new DataView(bytes.buffer);
    const n = Number(dv.getBigUint64(0, true));
    expect(n % 8).toBe(0);
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
    expect(header.__metadata__).toEqual({ note: 'hi' });
    expect(header.a32).toEqual({ dtype: 'F32', shape: [2, 3, 4], data_offsets: [0, 96] });
    expect(header.a16).toEqual({ dtype: 'F16', shape: [24], data_offsets: [96, 144] });
    expect(header.abf).toEqual({ dtype: 'BF16', shape: [4, 6], data_offsets: [144, 192] });
    expect(bytes.length).toBe(8 + n + 192);
    for (let i = 0; i < 24; i++) {
      expect(dv.getFloat32(8 + n + 4 * i, true)).toBe(a[i]);
      expect(dv.getUint16(8 + n + 96 + 2 * i, true)).toBe(f16Pattern(a[i]));
      // bfloat16 = the upper 16 bits of the float32 pattern (exact values: no rounding).
      expect(dv.getUint16(8 + n + 144 + 2 * i, true)).toBe(dv.getUint32(8 + n + 4 * i, true) >>> 16);
    }
    const file = join(dir, 'x.safetensors');
    writeFileSync(file, bytes);
    const f = await SafetensorsFile.open(file);
    expect(f.header.metadata).toEqual({ note: 'hi' });
    for (const name of ['a32', 'a16', 'abf']) expect(Array.from((await f.readFloat32(name)).data)).toEqual(Array.from(a));
    await f.close();
  });

  it('rejects corrupt and truncated files, naming the file', async () => {
    const good = encodeSafetensors([{ name: 'w', shape: [8], data: new Float32Array(8) }]);
    const cases: [string, Uint8Array, string, RegExp][] = [
      ['short.safetensors', good.subarray(0, 5), 'truncated', /short\.safetensors is truncated/],
      ['cuthead.safetensors', good.subarray(0, 20), 'truncated', /cuthead\.safetensors is truncated: its header claims/],
      ['cutdata.safetensors', good.subarray(0, good.length - 4), 'truncated', /cutdata\.safetensors is truncated: tensor "w" ends at byte/],
    ];
    const junk = new Uint8Array(good);
    junk.set(new TextEncoder().encode('{{{{'), 8);
    cases.push(['junk.safetensors', junk, 'corrupt', /junk\.safetensors: safetensors header is not valid UTF-8 JSON/]);
    const huge = new Uint8Array(good);
    new DataView(huge.buffer).setBigUint64(0, 1n << 40n, true);
    cases.push(['huge.safetensors', huge, 'corrupt', /huge\.safetensors: safetensors header length \d+ is implausible/]);
    const wrongSize = encodeSafetensors([{ name: 'w', shape: [8], data: new Float32Array(8) }]);
    const h = new TextDecoder().decode(wrongSize.subarray(8, 8 + Number(new DataView(wrongSize.buffer).getBigUint64(0, true))));
    const patched = new TextEncoder().encode(h.replace('[8]', '[9]'));
    const ws = new Uint8Array(wrongSize);
    ws.set(patched, 8);
    cases.push(['size.safetensors', ws, 'corrupt', /size\.safetensors: tensor "w" \(F32 \[9\]\) should take 36 bytes but data_offsets span 32/]);
    for (const [name, bytes, code, re] of cases) {
      const file = join(dir, name);
      writeFileSync(file, bytes);
      const e = await kvErr(SafetensorsFile.open(file));
      expect(e.code, name).toBe(code);
      expect(e.message, name).toMatch(re);
    }
  });
});

describe('config.json mapping', () => {
  it('maps Llama, Qwen2 and Mistral configs', () => {
    const llama = parseHfConfig({
      architectures: ['LlamaForCausalLM'],
      hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8,
      vocab_size: 128256, max_position_embeddings: 131072, rms_norm_eps: 1e-5, rope_theta: 500000, tie_word_embeddings: false,
      rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
      bos_token_id: 128000, eos_token_id: [128001, 128008, 128009], hidden_act: 'silu',
    });
    expect(llama).toEqual({
      nLayers: 32, nHeads: 32, nKvHeads: 8, headDim: 128, dim: 4096, hiddenDim: 14336, vocabSize: 128256, maxSeqLen: 131072,
      normEps: 1e-5, tiedEmbeddings: false, qkvBias: false, bosId: 128000, eosId: 128001,
      rope: { theta: 500000, layout: 'half', scaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 } },
    });
    const qwen = parseHfConfig({
      architectures: ['Qwen2ForCausalLM'], hidden_size: 896, intermediate_size: 4864, num_hidden_layers: 24, num_attention_heads: 14,
      num_key_value_heads: 2, vocab_size: 151936, max_position_embeddings: 32768, rms_norm_eps: 1e-6, rope_theta: 1000000,
      tie_word_embeddings: true, rope_scaling: null,
    });
    expect(qwen).toMatchObject({ headDim: 64, qkvBias: true, tiedEmbeddings: true, rope: { theta: 1e6, layout: 'half', scaling: null } });
    const mistral = parseHfConfig({
      architectures: ['MistralForCausalLM'], hidden_size: 5120, head_dim: 128, intermediate_size: 14336, num_hidden_layers: 40,
      num_attention_heads: 32, num_key_value_heads: 8, vocab_size: 131072, max_position_embeddings: 1024000,
      rope_scaling: { type: 'linear', factor: 2 },
    });
    // head_dim from config.json (5120 / 32 would be 160).
    expect(mistral).toMatchObject({ headDim: 128, nHeads: 32, qkvBias: false, normEps: 1e-6, rope: { theta: 10000, scaling: { type: 'linear', factor: 2 } } });
  });

  it('rejects unsupported architectures and settings with clear errors', () => {
    const base = { architectures: ['LlamaForCausalLM'], hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4, vocab_size: 10 };
    const bad: [Record<string, unknown>, string, RegExp][] = [
      [{ ...base, architectures: ['GPT2LMHeadModel'] }, 'unsupported', /architecture \["GPT2LMHeadModel"\] is not supported/],
      [{ ...base, rope_scaling: { rope_type: 'yarn', factor: 4 } }, 'unsupported', /rope_scaling type "yarn" is not supported/],
      [{ ...base, hidden_act: 'gelu' }, 'unsupported', /hidden_act "gelu"/],
      [{ ...base, num_key_value_heads: 3 }, 'config', /not a multiple of num_key_value_heads 3/],
      [{ ...base, hidden_size: undefined }, 'config', /"hidden_size" must be a positive integer/],
      [{ ...base, attention_bias: true }, 'unsupported', /attention_bias/],
    ];
    for (const [cfg, code, re] of bad) {
      let err: unknown;
      try {
        parseHfConfig(cfg, 'cfg.json');
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe(code);
      expect((err as KvpackError).message).toMatch(re);
      expect((err as KvpackError).message).toContain('cfg.json');
    }
  });
});

const SPEC: TinySpec = { dim: 64, hiddenDim: 96, nLayers: 3, nHeads: 4, nKvHeads: 2, vocabSize: 50 };

describe('Hugging Face directory loader', () => {
  it('loads sharded BF16 and single-file F16 checkpoints: transposed to [in, out], tied classifier', async () => {
    for (const [name, spec, opts] of [
      ['sharded', SPEC, { shards: 3, dtype: 'BF16' }],
      ['single-tied', { ...SPEC, arch: 'Qwen2ForCausalLM', tied: true }, { dtype: 'F16' }],
    ] as const) {
      const ck = tinyCheckpoint(spec, 5);
      const d = join(dir, name);
      writeHfDir(d, ck, opts);
      const start = tf.memory().numTensors;
      const w = await loadHfWeights(d);
      const T = (hf: string, t: tf.Tensor, transpose: boolean) => {
        const src = ck.tensors.get(hf)!;
        const got = t.dataSync();
        if (!transpose) {
          expect(t.shape, hf).toEqual(src.shape);
          expect(Array.from(got), hf).toEqual(Array.from(src.data));
          return;
        }
        const [out, inn] = src.shape;
        expect(t.shape, hf).toEqual([inn, out]);
        for (let o = 0; o < out; o++) for (let i = 0; i < inn; i++) if (got[i * out + o] !== src.data[o * inn + i]) expect.fail(`${hf}[${o}, ${i}]`);
      };
      T('model.embed_tokens.weight', w.embedding, false);
      T(spec.tied ? 'model.embed_tokens.weight' : 'lm_head.weight', w.classifier, true);
      T('model.norm.weight', w.finalNorm, false);
      for (let l = 0; l < spec.nLayers; l++) {
        const p = `model.layers.${l}.`;
        const L = w.layers[l];
        T(p + 'input_layernorm.weight', L.attnNorm, false);
        T(p + 'post_attention_layernorm.weight', L.ffnNorm, false);
        T(p + 'self_attn.q_proj.weight', L.wq, true);
        T(p + 'self_attn.k_proj.weight', L.wk, true);
        T(p + 'self_attn.v_proj.weight', L.wv, true);
        T(p + 'self_attn.o_proj.weight', L.wo, true);
        T(p + 'mlp.gate_proj.weight', L.w1, true);
        T(p + 'mlp.up_proj.weight', L.w3, true);
        T(p + 'mlp.down_proj.weight', L.w2, true);
        if (spec.arch === 'Qwen2ForCausalLM') {
          T(p + 'self_attn.q_proj.bias', L.bq!, false);
          T(p + 'self_attn.k_proj.bias', L.bk!, false);
          T(p + 'self_attn.v_proj.bias', L.bv!, false);
        } else expect(L.bq).toBeUndefined();
      }
      disposeLlamaWeights(w);
      expect(tf.memory().numTensors).toBe(start);
    }
  });

  it('names the missing shard, tensor, bad dtype and shape mismatch; frees what it loaded', async () => {
    const ck = tinyCheckpoint(SPEC, 6);
    const start = tf.memory().numTensors;

    const d1 = join(dir, 'noshard');
    writeHfDir(d1, ck, { shards: 3 });
    unlinkSync(join(d1, 'model-00002-of-00003.safetensors'));
    let e = await kvErr(loadHfWeights(d1));
    expect(e.code).toBe('io');
    expect(e.message).toMatch(/shard "model-00002-of-00003\.safetensors" listed in .*model\.safetensors\.index\.json is missing/);

    const d2 = join(dir, 'notensor');
    const ck2 = tinyCheckpoint(SPEC, 6);
    ck2.tensors.delete('model.layers.1.mlp.up_proj.weight');
    writeHfDir(d2, ck2, { shards: 2 });
    // The index still names it (as a broken export would).
    const idxFile = join(d2, 'model.safetensors.index.json');
    const idx = JSON.parse(readFileSync(idxFile, 'utf8'));
    idx.weight_map['model.layers.1.mlp.up_proj.weight'] = 'model-00001-of-00002.safetensors';
    writeFileSync(idxFile, JSON.stringify(idx));
    e = await kvErr(loadHfWeights(d2));
    expect(e.code).toBe('corrupt');
    expect(e.message).toContain('missing tensor "model.layers.1.mlp.up_proj.weight"');
    expect(e.message).toContain('model-00001-of-00002.safetensors');
    expect(tf.memory().numTensors).toBe(start);

    const d3 = join(dir, 'badshape');
    const ck3 = tinyCheckpoint(SPEC, 6);
    (ck3.config as Record<string, unknown>).intermediate_size = 128;
    writeHfDir(d3, ck3);
    e = await kvErr(loadHfWeights(d3));
    expect(e.code).toBe('shape');
    expect(e.message).toMatch(/model\.safetensors: tensor "model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight" has shape \[(96,64|64,96)\] but config\.json implies \[(128,64|64,128)\]/);
    expect(tf.memory().numTensors).toBe(start);

    const d4 = join(dir, 'baddtype');
    writeHfDir(d4, ck);
    // Rewrite one tensor's dtype to I32 (same byte size as F32).
    const f4 = join(d4, 'model.safetensors');
    const b4 = readFileSync(f4);
    const n4 = Number(b4.readBigUInt64LE(0));
    const h4 = JSON.parse(b4.subarray(8, 8 + n4).toString('utf8'));
    h4['model.layers.2.self_attn.v_proj.weight'].dtype = 'I32';
    let hs = JSON.stringify(h4);
    hs = hs.padEnd(n4, ' ');
    expect(hs.length).toBe(n4);
    b4.write(hs, 8, 'utf8');
    writeFileSync(f4, b4);
    e = await kvErr(loadHfWeights(d4));
    expect(e.code).toBe('unsupported');
    expect(e.message).toContain('tensor "model.layers.2.self_attn.v_proj.weight" has dtype I32');
    expect(e.message).toContain('model.safetensors');
    expect(tf.memory().numTensors).toBe(start);
  });

  it('wraps tokenizer.json and checks its vocabulary against config.json', async () => {
    const ck = tinyCheckpoint({ ...SPEC, vocabSize: 8 }, 2);
    const d = join(dir, 'withtok');
    writeHfDir(d, ck);
    const words = ['<pad>', '<bos>', '<eos>', 'the', 'cat', 'sat', 'on', 'mat'];
    const tokJson = (vocab: string[]) => ({
      version: '1.0',
      added_tokens: [0, 1, 2].map((id) => ({ id, content: vocab[id], special: true, single_word: false, lstrip: false, rstrip: false, normalized: false })),
      normalizer: null,
      pre_tokenizer: { type: 'WhitespaceSplit' },
      post_processor: null,
      decoder: null,
      model: { type: 'WordLevel', vocab: Object.fromEntries(vocab.map((w, i) => [w, i])), unk_token: '<pad>' },
    });
    writeFileSync(join(d, 'tokenizer.json'), JSON.stringify(tokJson(words)));
    writeFileSync(join(d, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<bos>', eos_token: '<eos>' }));
    const m = await loadHfModel(d);
    const tok = m.tokenizer!;
    expect(tok).toBeInstanceOf(HfTokenizer);
    expect(tok.vocabSize).toBe(8);
    expect(tok.bosId).toBe(1);
    expect(tok.eosId).toBe(2);
    expect(tok.encode('the cat sat on the mat')).toEqual([3, 4, 5, 6, 3, 7]);
    expect(tok.encode('the dog', { bos: true, eos: true })).toEqual([1, 3, 0, 2]); // unknown word → unk_token
    expect(tok.encode('<bos> the cat')).toEqual([1, 3, 4]);
    expect(tok.decode([3, 4, 5])).toBe('the cat sat');
    disposeLlamaWeights(m.weights);

    writeFileSync(join(d, 'tokenizer.json'), JSON.stringify(tokJson([...words, 'extra'])));
    const start = tf.memory().numTensors;
    const e = await kvErr(loadHfModel(d));
    expect(e.code).toBe('config');
    expect(e.message).toMatch(/tokenizer\.json: the tokenizer has 9 ids but config\.json's vocab_size is 8/);
    expect(tf.memory().numTensors).toBe(start);
  });
});
