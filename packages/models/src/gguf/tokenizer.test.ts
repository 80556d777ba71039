import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError } from '@kvpack/core';
import { MODELS_DIR } from '../hf/testutil.js';
import { ggufTokenizer, readGgufHeader } from './load.js';
import { SpmTokenizer } from './tokenizer.js';
import { encodeGguf, type GgufKV } from './testutil.js';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'kvpack-tok-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Writes a GGUF file holding only tokenizer metadata and returns its tokenizer. */
async function tokenizerFrom(name: string, kvs: GgufKV[]) {
  const file = join(dir, name);
  writeFileSync(file, encodeGguf([{ key: 'general.architecture', type: 'string', value: 'llama' }, ...kvs], []));
  return ggufTokenizer(await readGgufHeader(file));
}

describe('SentencePiece-style ("llama") GGUF tokenizer', () => {
  it('merges by score (ties leftmost), falls back to bytes, adds BOS/EOS on request', async () => {
    // ids:        0        1      2       3    4    5    6     7     8      9      10     11
    const tokens = ['<unk>', '<s>', '</s>', '▁', 'a', 'b', 'ab', '▁a', 'ba', '<0xC3>', '<0xA9>', 'aba'];
    const scores = [0, 0, 0, -1, -2, -2, -5, -3, -4, 0, 0, -6];
    const types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6, 6, 1];
    const tok = await tokenizerFrom('spm.gguf', [
      { key: 'tokenizer.ggml.model', type: 'string', value: 'llama' },
      { key: 'tokenizer.ggml.tokens', type: 'strings', value: tokens },
      { key: 'tokenizer.ggml.scores', type: 'f32s', value: scores },
      { key: 'tokenizer.ggml.token_type', type: 'i32s', value: types },
      { key: 'tokenizer.ggml.bos_token_id', type: 'u32', value: 1 },
      { key: 'tokenizer.ggml.eos_token_id', type: 'u32', value: 2 },
      { key: 'tokenizer.ggml.unknown_token_id', type: 'u32', value: 0 },
    ]);
    expect(tok).toBeInstanceOf(SpmTokenizer);
    expect(tok.vocabSize).toBe(12);
    // "ab" → "▁ab": pairs ▁a (−3), ab (−5) → ▁a wins; then "▁a"+"b" is no piece → [▁a, b].
    expect(tok.encode('ab')).toEqual([7, 5]);
    // "ba" → "▁ba": ▁b none, ba (−4) → [▁, ba].
    expect(tok.encode('ba', { bos: true, eos: true })).toEqual([1, 3, 8, 2]);
    // "bab" → "▁bab": ba (−4) at 1 and ab (−5) at 2 → ba; then ba+b none → [▁, ba, b].
    expect(tok.encode('bab')).toEqual([3, 8, 5]);
    // "bb": no pair → [▁, b, b]. Equal scores: "aa" has no piece.
    expect(tok.encode('bb')).toEqual([3, 5, 5]);
    // é (U+00E9) is no piece: its UTF-8 bytes C3 A9 are used. "x" has no byte piece: unknown id.
    expect(tok.encode('bé')).toEqual([3, 5, 9, 10]);
    expect(tok.encode('x')).toEqual([3, 0]);
    expect(tok.encode('')).toEqual([]);
    expect(tok.decode([1, 7, 5, 3, 8, 9, 10, 2])).toBe('ab baé');
  });

  it('ties between equal scores merge the leftmost pair', () => {
    const tok = new SpmTokenizer({ tokens: ['<unk>', 'a', 'aa'], scores: [0, 0, -1], addSpacePrefix: false, unkId: 0 });
    // "aaa": pairs (0,1) and (1,2) both "aa" (−1): the left one merges → [aa, a].
    expect(tok.encode('aaa')).toEqual([2, 1]);
  });

  const tokFile = join(MODELS_DIR, 'stories260K', 'tok512.bin');
  const fixture = new URL('../llama2c/__fixtures__/runc-encode.json', import.meta.url);
  const have = existsSync(tokFile) && existsSync(fixture);
  it.skipIf(!have)(`encodes like llama2.c run.c on tok512 (compiled run.c fixture)${have ? '' : ` (skipped: ${tokFile} or the run.c fixture is absent)`}`, async () => {
    // tok512.bin: int32 max_len, then per piece float32 score, int32 length, bytes. llama2.c writes
    // "▁" as a space; GGUF keeps "▁".
    const tb = readFileSync(tokFile);
    const tokens: string[] = [];
    const scores: number[] = [];
    for (let p = 4; p < tb.length; ) {
      scores.push(tb.readFloatLE(p));
      const n = tb.readInt32LE(p + 4);
      tokens.push(tb.subarray(p + 8, p + 8 + n).toString('utf8').replaceAll(' ', '▁'));
      p += 8 + n;
    }
    const tok = await tokenizerFrom('tok512.gguf', [
      { key: 'tokenizer.ggml.model', type: 'string', value: 'llama' },
      { key: 'tokenizer.ggml.tokens', type: 'strings', value: tokens },
      { key: 'tokenizer.ggml.scores', type: 'f32s', value: scores },
      { key: 'tokenizer.ggml.token_type', type: 'i32s', value: tokens.map((_, i) => (i === 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1)) },
      { key: 'tokenizer.ggml.bos_token_id', type: 'u32', value: 1 },
      { key: 'tokenizer.ggml.eos_token_id', type: 'u32', value: 2 },
    ]);
    const cases = JSON.parse(readFileSync(fixture, 'utf8')).cases as { text: string; ids: number[] }[];
    expect(cases.length).toBeGreaterThan(4);
    for (const c of cases) expect(tok.encode(c.text, { bos: true }), JSON.stringify(c.text)).toEqual(c.ids);
    for (const c of cases) if (c.text && !c.text.startsWith(' ')) expect(tok.decode(c.ids)).toBe(c.text);
  });
});

/** GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100 + n. */
function byteChars(): string[] {
  const keep = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const out: string[] = [];
  let n = 0;
  for (let b = 0; b < 256; b++) out.push(keep(b) ? String.fromCharCode(b) : String.fromCharCode(256 + n++));
  return out;
}

describe('byte-level BPE ("gpt2") GGUF tokenizer', () => {
  const bc = byteChars();
  const merges = ['h e', 'l l', 'he ll', 'hell o', 'Ġ w', 'Ġw o', 'r l', 'Ġwo rl', 'Ġworl d', '1 2', '3 4', '12 3', '4 5'];
  const tokens = [...bc, ...merges.map((m) => m.replace(' ', '')), '<|end|>'];
  const id = (t: string) => tokens.indexOf(t);
  const make = (pre: string) =>
    tokenizerFrom(`gpt2-${pre}.gguf`, [
      { key: 'tokenizer.ggml.model', type: 'string', value: 'gpt2' },
      { key: 'tokenizer.ggml.pre', type: 'string', value: pre },
      { key: 'tokenizer.ggml.tokens', type: 'strings', value: tokens },
      { key: 'tokenizer.ggml.merges', type: 'strings', value: merges },
      { key: 'tokenizer.ggml.token_type', type: 'i32s', value: tokens.map((t) => (t === '<|end|>' ? 3 : 1)) },
      { key: 'tokenizer.ggml.eos_token_id', type: 'u32', value: tokens.length - 1 },
    ]);

  it('applies merges by rank within GPT-2 pre-tokens and round-trips bytes', async () => {
    const tok = await make('gpt-2');
    expect(tok.vocabSize).toBe(tokens.length);
    expect(tok.encode('hello world')).toEqual([id('hello'), id('Ġworld')]);
    // "12345" is one pre-token: 1 2 (rank 9) → 12; then 3 4 (rank 10) before 12 3 (rank 11) → [12, 34, 5].
    expect(tok.encode('12345')).toEqual([id('12'), id('34'), id('5')]);
    // ! and the two UTF-8 bytes of é map to their byte characters.
    expect(tok.encode('hi!é', { eos: true })).toEqual([id('h'), id('i'), id('!'), id(bc[0xc3]), id(bc[0xa9]), tokens.length - 1]);
    expect(tok.decode(tok.encode('hello world, 12345 hi!é'))).toBe('hello world, 12345 hi!é');
  });

  it('uses the Llama 3 pre-tokenizer (digits in groups of three) for "llama-bpe"', async () => {
    const tok = await make('llama-bpe');
    // Pre-tokens "123" and "45": → [123], [45].
    expect(tok.encode('12345')).toEqual([id('123'), id('45')]);
    expect(tok.encode('hello world')).toEqual([id('hello'), id('Ġworld')]);
  });

  it('rejects unknown tokenizer models and pre-tokenizers', async () => {
    const e1 = await tokenizerFrom('bert.gguf', [{ key: 'tokenizer.ggml.model', type: 'string', value: 'bert' }, { key: 'tokenizer.ggml.tokens', type: 'strings', value: ['a'] }]).catch((e) => e);
    expect(e1).toBeInstanceOf(KvpackError);
    expect(e1.code).toBe('unsupported');
    expect(e1.message).toMatch(/bert\.gguf: tokenizer model "bert" is not supported/);
    const e2 = await make('falcon').catch((e) => e);
    expect(e2).toBeInstanceOf(KvpackError);
    expect(e2.message).toMatch(/pre-tokenizer "falcon" is not supported/);
  });
});
