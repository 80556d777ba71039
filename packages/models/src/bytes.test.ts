import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { loadModelFromBytes, loadModelFromUrl, loadTokenizerFromBytes, readByteSource, sniffModelBytes, type ByteSource } from './bytes.js';
import { loadModel, loadTokenizer, type LoadedModel } from './load.js';
import { LlamaModel } from './model/index.js';
import { disposeLlamaWeights, hfSlotOf } from './hf/index.js';
import { ggufTensorName } from './gguf/index.js';
import { tinyCheckpoint, writeHfDir, type TinySpec } from './hf/testutil.js';
import { encodeGguf, f32Bytes, type GgufKV } from './gguf/testutil.js';

const models = resolve(fileURLToPath(new URL('.', import.meta.url)), '../../../models');
const CKPT = join(models, 'stories260K/stories260K_q80.bin');
const TOK = join(models, 'stories260K/tok512.bin');
const SPEC: TinySpec = { dim: 32, hiddenDim: 48, nLayers: 2, nHeads: 4, nKvHeads: 2, vocabSize: 8 };
const WORDS = ['<pad>', '<bos>', '<eos>', 'the', 'cat', 'sat', 'on', 'mat'];
const TOKENIZER_JSON = JSON.stringify({
  version: '1.0',
  added_tokens: [0, 1, 2].map((id) => ({ id, content: WORDS[id], special: true, single_word: false, lstrip: false, rstrip: false, normalized: false })),
  normalizer: null,
  pre_tokenizer: { type: 'WhitespaceSplit' },
  post_processor: null,
  decoder: null,
  model: { type: 'WordLevel', vocab: Object.fromEntries(WORDS.map((w, i) => [w, i])), unk_token: '<pad>' },
});

let dir: string;
let server: Server;
let base: string;
const requests: string[] = [];

beforeAll(async () => {
  await selectBackend('wasm');
  dir = mkdtempSync(join(tmpdir(), 'kvpack-bytes-'));
  // A Hugging Face model in 3 BF16 shards with a tokenizer, served on loopback.
  const hf = join(dir, 'hf');
  writeHfDir(hf, tinyCheckpoint(SPEC, 5), { shards: 3, dtype: 'BF16' });
  writeFileSync(join(hf, 'tokenizer.json'), TOKENIZER_JSON);
  writeFileSync(join(hf, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<bos>', eos_token: '<eos>' }));
  server = createServer((req, res) => {
    requests.push(req.url ?? '');
    const f = join(dir, decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname));
    try {
      const body = readFileSync(f);
      res.writeHead(200, { 'Content-Length': body.length }).end(body);
    } catch {
      res.writeHead(404).end('not found');
    }
  });
  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', ok));
  base = `http://127.0.0.1:${(server.address() as { port: number }).port}/`;
});
afterAll(async () => {
  await new Promise((ok) => server.close(ok));
  rmSync(dir, { recursive: true, force: true });
});

async function fingerprint(m: LoadedModel): Promise<string> {
  const model = new LlamaModel(m.weights);
  try {
    return await model.fingerprint();
  } finally {
    model.dispose();
  }
}

async function kvErr(p: Promise<unknown>): Promise<KvpackError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(KvpackError);
  return e as KvpackError;
}

/** A ReadableStream of `bytes` in chunks of `n`. */
function chunks(bytes: Uint8Array, n: number): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream({
    pull(c) {
      if (at >= bytes.length) return c.close();
      c.enqueue(bytes.slice(at, at + n));
      at += n;
    },
  });
}

describe('byte sources', () => {
  it('reads buffers, views, Blobs, Responses and streams to the same bytes, with progress', async () => {
    const b = Uint8Array.from({ length: 1000 }, (_, i) => (i * 7) & 255);
    const seen: [number, number | undefined][] = [];
    const sources: ByteSource[] = [b, b.buffer, new DataView(b.buffer), new Blob([b]), new Response(b), chunks(b, 97), new Response(chunks(b, 33))];
    for (const s of sources) expect([...(await readByteSource(s, { onProgress: (l, t) => seen.push([l, t]) }))]).toEqual([...b]);
    expect(seen).toContainEqual([1000, 1000]); // Blob: its size is the total
    expect(seen).toContainEqual([97 * 3, undefined]); // a bare stream: total unknown
    const e = await kvErr(readByteSource(new Response('gone', { status: 404, statusText: 'Not Found' }), { name: 'x.gguf' }));
    expect([e.code, e.message]).toEqual(['io', 'x.gguf: HTTP 404 Not Found']);
    expect((await kvErr(readByteSource(42 as never))).code).toBe('unsupported');
  });

  it('tells formats by their first bytes', async () => {
    expect(sniffModelBytes(readFileSync(CKPT))).toBe('llama2c');
    expect(sniffModelBytes(readFileSync(join(dir, 'hf/model-00001-of-00003.safetensors')))).toBe('safetensors');
    expect(sniffModelBytes(new TextEncoder().encode(' {"a":1}'))).toBe('json');
    expect(sniffModelBytes(encodeGguf([], []))).toBe('gguf');
    expect(sniffModelBytes(new Uint8Array([1, 2, 3, 4, 5]), 'old.bin')).toBe('llama2c'); // version 0 has no magic
    expect(sniffModelBytes(new TextEncoder().encode('just text'))).toBeUndefined();
    expect(sniffModelBytes(new Uint8Array([16, 0, 0, 0, 0, 0, 0, 0, 123]), 'cut.safetensors')).toBe('safetensors');
  });
});

describe('loading models from bytes', () => {
  it('loads a llama2.c checkpoint and tokenizer from every kind of source: the same weights and tokenizer as from the files', async () => {
    const start = tf.memory().numTensors;
    const fromPath = await loadModel(CKPT, { tokenizer: TOK });
    const want = await fingerprint(fromPath);
    const text = 'Once upon a time, Lily saw a cat.';
    const ids = fromPath.tokenizer!.encode(text, { bos: true });
    const ck = readFileSync(CKPT);
    const tok = readFileSync(TOK);
    for (const [m, t] of [
      [new Uint8Array(ck), new Uint8Array(tok)],
      [new Blob([ck]), new Blob([tok])],
      [new Response(ck), new Response(tok)],
      [chunks(ck, 4096), chunks(tok, 100)],
    ] as [ByteSource, ByteSource][]) {
      const got = await loadModelFromBytes({ 'stories260K_q80.bin': m, 'tok512.bin': t });
      expect(got.format).toBe('llama2c');
      expect(got.tokenizer!.encode(text, { bos: true })).toEqual(ids);
      expect(await fingerprint(got)).toBe(want);
    }
    // By URL: the tokenizer beside the checkpoint (tok512.bin here) is found as loadModel finds it.
    mkdirSync(join(dir, 'stories'), { recursive: true });
    copyFileSync(CKPT, join(dir, 'stories/stories260K_q80.bin'));
    copyFileSync(TOK, join(dir, 'stories/tok512.bin'));
    requests.length = 0;
    const byUrl = await loadModelFromUrl(`${base}stories/stories260K_q80.bin?v=1`);
    expect(requests).toEqual(['/stories/stories260K_q80.bin?v=1', '/stories/tokenizer.bin', '/stories/tok512.bin']);
    expect(byUrl.tokenizer!.encode(text, { bos: true })).toEqual(ids);
    expect(await fingerprint(byUrl)).toBe(want);
    // A checkpoint alone: no tokenizer.
    const alone = await loadModelFromBytes(new Blob([ck]));
    expect(alone.tokenizer).toBeUndefined();
    disposeLlamaWeights(alone.weights);
    // The tokenizer alone, checked against the vocabulary.
    expect((await loadTokenizerFromBytes(tok, { name: 'tok512.bin', vocabSize: 512 })).encode(text)).toEqual(fromPath.tokenizer!.encode(text));
    expect((await kvErr(loadTokenizerFromBytes(tok, { name: 'tok512.bin', vocabSize: 100 }))).message).toMatch(/tok512\.bin: the tokenizer has 512 tokens but the model's vocabulary has 100/);
    expect(tf.memory().numTensors).toBe(start);
  });

  it('loads a sharded safetensors model with tokenizer.json from bytes and by URL: the weights of the directory loader', async () => {
    const start = tf.memory().numTensors;
    const hf = join(dir, 'hf');
    const fromDir = await loadModel(hf);
    const want = await fingerprint(fromDir);
    const files = Object.fromEntries(readdirSync(hf).map((f) => [f, new Blob([readFileSync(join(hf, f))])]));
    const fromBytes = await loadModelFromBytes(files);
    expect(fromBytes.format).toBe('hf');
    expect(fromBytes.tokenizer!.encode('the cat sat on the mat')).toEqual([3, 4, 5, 6, 3, 7]);
    expect(fromBytes.tokenizer!.bosId).toBe(1);
    expect(await fingerprint(fromBytes)).toBe(want);

    requests.length = 0;
    const progress = new Set<string>();
    const fromUrl = await loadModelFromUrl(`${base}hf/`, { onProgress: (f) => progress.add(f) });
    expect(fromUrl.tokenizer!.encode('the mat')).toEqual([3, 7]);
    expect(await fingerprint(fromUrl)).toBe(want);
    expect(requests.filter((r) => r.endsWith('.safetensors')).sort()).toEqual([1, 2, 3].map((i) => `/hf/model-0000${i}-of-00003.safetensors`));
    expect(progress).toContain('model-00002-of-00003.safetensors');
    expect(await fingerprint(await loadModelFromUrl(`${base}hf/config.json`))).toBe(want);
    expect(await fingerprint(await loadModelFromUrl(`${base}hf/model.safetensors.index.json`))).toBe(want);
    expect((await kvErr(loadModelFromUrl(`${base}hf/README.md`))).message).toMatch(/README\.md: expected a \.gguf or llama2\.c \.bin file, or a Hugging Face model folder/);
    expect(tf.memory().numTensors).toBe(start);
  });

  it('loads a GGUF file from bytes as from its path', async () => {
    const start = tf.memory().numTensors;
    const ck = tinyCheckpoint(SPEC, 7);
    const c = ck.config as Record<string, number>;
    const kvs: GgufKV[] = [
      { key: 'general.architecture', type: 'string', value: 'llama' },
      { key: 'llama.context_length', type: 'u32', value: c.max_position_embeddings },
      { key: 'llama.embedding_length', type: 'u32', value: c.hidden_size },
      { key: 'llama.block_count', type: 'u32', value: c.num_hidden_layers },
      { key: 'llama.feed_forward_length', type: 'u32', value: c.intermediate_size },
      { key: 'llama.attention.head_count', type: 'u32', value: c.num_attention_heads },
      { key: 'llama.attention.head_count_kv', type: 'u32', value: c.num_key_value_heads },
      { key: 'llama.rope.freq_base', type: 'f32', value: c.rope_theta },
      { key: 'llama.attention.layer_norm_rms_epsilon', type: 'f32', value: c.rms_norm_eps },
    ];
    const tensors = [...ck.tensors]
      .map(([name, t]) => ({ slot: hfSlotOf(name), t }))
      .filter((x) => x.slot !== null)
      .map(({ slot, t }) => ({ name: ggufTensorName(slot!), ne: [...t.shape].reverse(), type: 0, data: f32Bytes(t.data) }));
    const bytes = encodeGguf(kvs, tensors);
    const file = join(dir, 'tiny.gguf');
    writeFileSync(file, bytes);
    const want = await fingerprint(await loadModel(file));
    const got = await loadModelFromBytes({ 'tiny.gguf': new Blob([bytes]) });
    expect(got.format).toBe('gguf');
    expect(await fingerprint(got)).toBe(want);
    expect(await fingerprint(await loadModelFromUrl(`${base}tiny.gguf`))).toBe(want);
    // Cut short: the loader names the file.
    const e = await kvErr(loadModelFromBytes({ 'cut.gguf': bytes.subarray(0, bytes.length - 100) }));
    expect(e.code).toBe('truncated');
    expect(e.message).toMatch(/^cut\.gguf/);
    expect(tf.memory().numTensors).toBe(start);
  });

  it('names what is wrong: unknown bytes, safetensors without config.json, a missing shard or URL, a corrupt tokenizer.json', async () => {
    const start = tf.memory().numTensors;
    let e = await kvErr(loadModelFromBytes({ 'notes.txt': new TextEncoder().encode('just text') }));
    expect([e.code, e.message]).toEqual(['unsupported', 'notes.txt: unknown model format (expected a .gguf file, a llama2.c .bin checkpoint, or config.json with .safetensors weights)']);
    const st = readFileSync(join(dir, 'hf/model-00001-of-00003.safetensors'));
    e = await kvErr(loadModelFromBytes({ 'model.safetensors': st }));
    expect(e.message).toMatch(/safetensors weights need their config\.json/);
    // A damaged safetensors file beside its config.json: the safetensors reader names it.
    e = await kvErr(loadModelFromBytes({ 'config.json': readFileSync(join(dir, 'hf/config.json')), 'model.safetensors': st.subarray(0, 20) }));
    expect([e.code, e.message]).toEqual(['truncated', expect.stringMatching(/^model\.safetensors is truncated/)]);
    const hf = join(dir, 'hf');
    const files = Object.fromEntries(readdirSync(hf).filter((f) => !f.startsWith('model-00002')).map((f) => [f, readFileSync(join(hf, f))]));
    e = await kvErr(loadModelFromBytes(files));
    expect([e.code, e.message]).toEqual(['io', 'shard "model-00002-of-00003.safetensors" listed in model.safetensors.index.json is missing from the model files']);
    e = await kvErr(loadModelFromUrl(`${base}nowhere/model.gguf`));
    expect([e.code, e.message]).toEqual(['io', `${base}nowhere/model.gguf: HTTP 404 Not Found`]);
    e = await kvErr(loadModelFromUrl(`${base}nowhere/`));
    expect(e.message).toBe(`${base}nowhere/config.json: HTTP 404 Not Found`);
    e = await kvErr(loadTokenizerFromBytes(new TextEncoder().encode('{"model": '), { name: 'tokenizer.json' }));
    expect([e.code, e.message]).toEqual(['corrupt', expect.stringMatching(/^tokenizer\.json is not valid JSON/)]);
    expect(tf.memory().numTensors).toBe(start);
  });

  it('loads tokenizer.json from bytes as from its file', async () => {
    const fromFile = await loadTokenizer(join(dir, 'hf'));
    const fromBytes = await loadTokenizerFromBytes(new TextEncoder().encode(TOKENIZER_JSON), {
      name: 'tokenizer.json',
      tokenizerConfig: new Blob([JSON.stringify({ bos_token: '<bos>', eos_token: '<eos>' })]),
    });
    for (const t of ['the cat sat on the mat', 'the dog', '<bos> the cat']) expect(fromBytes.encode(t, { bos: true })).toEqual(fromFile.encode(t, { bos: true }));
    expect(fromBytes.decode([3, 4, 5])).toBe('the cat sat');
  });
});
