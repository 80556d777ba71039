// Property tests over the GGUF loader's header: bit flips and byte edits in the header region,
// truncations at any length and random count/length/offset fields end in a loaded model or a
// KvpackError, never another error type, an abort or a leaked tensor. Seeded and bounded.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError, selectBackend } from '@kvpack/core';
import { tinyCheckpoint, type TinySpec } from '../hf/testutil.js';
import { FuzzTally, growingBits, releaseWeights } from '../fuzz.testutil.js';
import { loadGgufModel, readGgufHeader } from './load.js';
import { encodeGguf, f32Bytes, quantizeQ8_0, type GgufKV, type GgufTensorSpec } from './testutil.js';

const SPEC: TinySpec = { dim: 32, hiddenDim: 64, nLayers: 2, nHeads: 4, nKvHeads: 2, vocabSize: 20 };
const NAMES: [RegExp, string][] = [
  [/^model\.embed_tokens\.weight$/, 'token_embd.weight'],
  [/^model\.norm\.weight$/, 'output_norm.weight'],
  [/^lm_head\.weight$/, 'output.weight'],
  [/^model\.layers\.(\d+)\.input_layernorm\.weight$/, 'blk.$1.attn_norm.weight'],
  [/^model\.layers\.(\d+)\.post_attention_layernorm\.weight$/, 'blk.$1.ffn_norm.weight'],
  [/^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$/, 'blk.$1.attn_$2.weight'],
  [/^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$/, 'blk.$1.attn_output.weight'],
  [/^model\.layers\.(\d+)\.mlp\.gate_proj\.weight$/, 'blk.$1.ffn_gate.weight'],
  [/^model\.layers\.(\d+)\.mlp\.up_proj\.weight$/, 'blk.$1.ffn_up.weight'],
  [/^model\.layers\.(\d+)\.mlp\.down_proj\.weight$/, 'blk.$1.ffn_down.weight'],
];
const ggufName = (hf: string) => {
  for (const [re, to] of NAMES) if (re.test(hf)) return hf.replace(re, to);
  throw new Error(`no GGUF name for ${hf}`);
};

/** A small llama GGUF: F32 vectors, Q8_0 matrices (ne[0] = 32 or 64), a "llama" tokenizer. */
function tinyGguf(): Uint8Array {
  const ck = tinyCheckpoint(SPEC, 4);
  const tensors: GgufTensorSpec[] = [...ck.tensors].map(([hf, t]) => ({
    name: ggufName(hf),
    ne: [...t.shape].reverse(),
    type: t.shape.length === 1 ? 0 : 8,
    data: t.shape.length === 1 ? f32Bytes(t.data) : quantizeQ8_0(t.data),
  }));
  const tokens = ['<unk>', '<s>', '</s>', '▁', 'a', 'b'];
  for (let i = tokens.length; i < SPEC.vocabSize; i++) tokens.push(`▁t${i}`);
  const kvs: GgufKV[] = [
    { key: 'general.architecture', type: 'string', value: 'llama' },
    { key: 'llama.context_length', type: 'u32', value: 64 },
    { key: 'llama.embedding_length', type: 'u32', value: SPEC.dim },
    { key: 'llama.block_count', type: 'u32', value: SPEC.nLayers },
    { key: 'llama.feed_forward_length', type: 'u32', value: SPEC.hiddenDim },
    { key: 'llama.attention.head_count', type: 'u32', value: SPEC.nHeads },
    { key: 'llama.attention.head_count_kv', type: 'u32', value: SPEC.nKvHeads },
    { key: 'llama.rope.freq_base', type: 'f32', value: 10000 },
    { key: 'llama.attention.layer_norm_rms_epsilon', type: 'f32', value: 1e-5 },
    { key: 'tokenizer.ggml.model', type: 'string', value: 'llama' },
    { key: 'tokenizer.ggml.tokens', type: 'strings', value: tokens },
    { key: 'tokenizer.ggml.scores', type: 'f32s', value: tokens.map((_, i) => -i) },
    { key: 'tokenizer.ggml.token_type', type: 'i32s', value: tokens.map((_, i) => (i === 0 ? 2 : i < 3 ? 3 : 1)) },
    { key: 'tokenizer.ggml.bos_token_id', type: 'u32', value: 1 },
    { key: 'tokenizer.ggml.eos_token_id', type: 'u32', value: 2 },
  ];
  return encodeGguf(kvs, tensors);
}

let tmp: string;
const tallies: FuzzTally[] = [];
beforeAll(async () => {
  await selectBackend('wasm');
  tmp = mkdtempSync(join(tmpdir(), 'kvpack-gguf-fuzz-'));
});
afterAll(() => {
  for (const t of tallies) console.log(t.line());
  rmSync(tmp, { recursive: true, force: true });
});

async function mustBeNamed<T>(t: FuzzTally, run: () => Promise<T>, release?: (r: T) => void, hostile = false): Promise<unknown> {
  const leaks = t.leaks;
  const err = await t.trial(run, release, { hostile });
  if (err !== null && !(err instanceof KvpackError)) throw new Error(`not a KvpackError: ${(err as Error)?.stack ?? String(err)}`);
  if (t.leaks !== leaks) throw new Error('leaked tfjs tensors');
  return err;
}

const GOOD = tinyGguf();
const buf = Buffer.from(GOOD);
/** Offset of the value after a metadata key whose value is a scalar (skips the u32 value type). */
const afterKey = (key: string) => buf.indexOf(Buffer.from(key)) + key.length + 4;
const BLOCK_COUNT_AT = afterKey('llama.block_count');
/** The u64 element count of the tokens array (after the array's u32 element type). */
const TOKENS_COUNT_AT = afterKey('tokenizer.ggml.tokens') + 4;
/** The tensor info of blk.0.attn_q.weight: name, u32 n_dims, u64 ne[0], u64 ne[1], u32 type, u64 offset. */
const Q_INFO = buf.lastIndexOf(Buffer.from('blk.0.attn_q.weight')) + 'blk.0.attn_q.weight'.length;
/** Integer fields of the header: [offset, bytes]. */
const FIELDS: [string, number, 4 | 8][] = [
  ['tensor_count', 8, 8],
  ['kv_count', 16, 8],
  ['first key length', 24, 8],
  ['block_count', BLOCK_COUNT_AT, 4],
  ['tokens array length', TOKENS_COUNT_AT, 8],
  ['attn_q n_dims', Q_INFO, 4],
  ['attn_q ne[0]', Q_INFO + 4, 8],
  ['attn_q ne[1]', Q_INFO + 12, 8],
  ['attn_q type', Q_INFO + 20, 4],
  ['attn_q offset', Q_INFO + 24, 8],
];

describe('GGUF header fuzzing (test-written Q8_0 file with a tokenizer)', () => {
  const tally = new FuzzTally('GGUF header');
  tallies.push(tally);
  const file = () => join(tmp, 'fuzz.gguf');

  it('the test file loads, and its field offsets point where the test thinks', async () => {
    writeFileSync(file(), GOOD);
    const h = await readGgufHeader(file());
    expect(h.metadata['llama.block_count']).toBe(2);
    expect(buf.readUInt32LE(BLOCK_COUNT_AT)).toBe(2);
    expect(Number(buf.readBigUInt64LE(TOKENS_COUNT_AT))).toBe(SPEC.vocabSize);
    expect(buf.readUInt32LE(Q_INFO)).toBe(2);
    expect(Number(buf.readBigUInt64LE(Q_INFO + 4))).toBe(SPEC.dim);
    expect(buf.readUInt32LE(Q_INFO + 20)).toBe(8);
    const m = await loadGgufModel(file());
    expect(m.config.nLayers).toBe(2);
    releaseWeights(m.weights);
  });

  it('bit flips and byte edits in the header, truncations and random integer fields: a model or a KvpackError, no leak', async () => {
    const h = await readGgufHeader(file());
    const headerEnd = Math.min(...[...h.tensors.values()].map((t) => t.start));
    const edit = fc.oneof(
      fc.record({ kind: fc.constant('flip' as const), at: fc.nat(headerEnd - 1), bit: fc.nat(7) }),
      fc.record({ kind: fc.constant('set' as const), at: fc.nat(headerEnd - 1), value: fc.nat(255) }),
      fc.record({ kind: fc.constant('cut' as const), length: fc.nat(GOOD.length) }),
      fc.record({
        kind: fc.constant('field' as const),
        field: fc.nat(FIELDS.length - 1),
        value: fc.oneof(fc.bigInt({ min: 0n, max: 64n }), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), fc.constantFrom(2n ** 31n, 2n ** 32n - 1n, 2n ** 63n, 2n ** 64n - 1n)),
      }),
    );
    await fc.assert(
      fc.asyncProperty(edit, async (e) => {
        let b: Buffer;
        if (e.kind === 'cut') b = Buffer.from(GOOD.subarray(0, e.length));
        else {
          b = Buffer.from(GOOD);
          if (e.kind === 'flip') b[e.at] ^= 1 << e.bit;
          else if (e.kind === 'set') b[e.at] = e.value;
          else {
            const [, at, width] = FIELDS[e.field];
            if (width === 4) b.writeUInt32LE(Number(e.value & 0xffffffffn), at);
            else b.writeBigUInt64LE(e.value, at);
          }
        }
        writeFileSync(file(), b);
        await mustBeNamed(tally, () => loadGgufModel(file()), (m) => releaseWeights(m.weights));
      }),
      { seed: 0x6609, numRuns: 250 },
    );
    expect(tally.other).toBe(0);
    expect(tally.leaks).toBe(0);
    expect(tally.named).toBeGreaterThan(100);
  });

  it('each growing bit of block_count gives a named error within one second', async () => {
    const bits = growingBits(SPEC.nLayers, 32);
    expect(bits).toHaveLength(31);
    for (const bit of bits) {
      const v = SPEC.nLayers + 2 ** bit;
      const b = Buffer.from(GOOD);
      b.writeUInt32LE(v, BLOCK_COUNT_AT);
      writeFileSync(file(), b);
      const t0 = performance.now();
      const err = await mustBeNamed(tally, () => loadGgufModel(file()), (m) => releaseWeights(m.weights), true);
      expect(performance.now() - t0).toBeLessThan(1000);
      expect(err, `block_count ${v}`).toBeInstanceOf(KvpackError);
      expect((err as KvpackError).code).toBe('config');
      expect((err as KvpackError).message).toBe(
        v <= 2048
          ? `fuzz.gguf: metadata llama.block_count = ${v} but the file holds 2 layers of tensors (blk.0 … blk.1)`
          : `fuzz.gguf: metadata "llama.block_count" = ${v} is above the sane bound 2048 (corrupt or hostile file)`,
      );
    }
  });

  it('high-bit flips of tensor_count, kv_count and an array length are refused against the file size within one second', async () => {
    for (const [field, at] of [
      ['tensor_count', 8],
      ['kv_count', 16],
      ['tokens array length', TOKENS_COUNT_AT],
    ] as const) {
      for (const bit of [20, 31, 40, 62, 63]) {
        const b = Buffer.from(GOOD);
        b.writeBigUInt64LE(b.readBigUInt64LE(at) ^ (1n << BigInt(bit)), at);
        writeFileSync(file(), b);
        const t0 = performance.now();
        const err = await mustBeNamed(tally, () => loadGgufModel(file()), (m) => releaseWeights(m.weights), true);
        expect(performance.now() - t0).toBeLessThan(1000);
        expect(err, `${field} bit ${bit}`).toBeInstanceOf(KvpackError);
        expect((err as KvpackError).code).toBe('truncated');
        const name = field === 'tokens array length' ? 'metadata "tokenizer.ggml.tokens" array length' : field;
        expect((err as KvpackError).message).toMatch(new RegExp(`^fuzz\\.gguf: header ${name.replace(/[.]/g, '\\.')} = [^ ]+ .*needs at least .* but the file has .* left \\(${GOOD.length} bytes`));
      }
    }
  });

  it('refuses overlapping tensor data, naming both tensors', async () => {
    const b = Buffer.from(GOOD);
    // Point blk.0.attn_q.weight's data at offset 0, where token_embd.weight (written first) lives.
    b.writeBigUInt64LE(0n, Q_INFO + 24);
    writeFileSync(file(), b);
    const err = await mustBeNamed(tally, () => loadGgufModel(file()), (m) => releaseWeights(m.weights));
    expect((err as KvpackError).code).toBe('corrupt');
    expect((err as KvpackError).message).toMatch(/^fuzz\.gguf: the data of tensors "[^"]+" \(bytes \d+\.\.\d+\) and "[^"]+" \(from byte \d+\) overlap$/);
    expect((err as KvpackError).message).toContain('blk.0.attn_q.weight');
  });
});
