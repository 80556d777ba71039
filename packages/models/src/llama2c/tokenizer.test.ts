import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KvpackError } from '@kvpack/core';
import { Llama2cTokenizer, loadLlama2cTokenizer, parseLlama2cTokenizer } from './index.js';
import { HAVE_STORIES, SKIP_STORIES, STORIES_TOK, readOracle } from '../model/reference.testutil.js';

/**
 * run.c's own encodings: karpathy/llama2.c run.c (commit 350e04f) compiled with gcc and driven by a
 * small harness calling encode(tokenizer, text, bos=1, eos=0) with tok512.bin (see `source`).
 */
const RUNC: { source: string; cases: { text: string; ids: number[] }[] } = JSON.parse(
  readFileSync(new URL('./__fixtures__/runc-encode.json', import.meta.url), 'utf8'),
);

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'kvpack-tok-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Writes a llama2.c tokenizer file: int32 max_token_length, then per piece float32 score, int32 length, bytes. */
function tokenizerFile(pieces: [string | Uint8Array, number][]): Uint8Array {
  const enc = pieces.map(([p, s]) => [typeof p === 'string' ? Buffer.from(p, 'utf8') : p, s] as const);
  const maxLen = Math.max(...enc.map(([b]) => b.length));
  const parts: Buffer[] = [Buffer.alloc(4)];
  parts[0].writeInt32LE(maxLen, 0);
  for (const [b, s] of enc) {
    const h = Buffer.alloc(8);
    h.writeFloatLE(s, 0);
    h.writeInt32LE(b.length, 4);
    parts.push(h, Buffer.from(b));
  }
  return Buffer.concat(parts);
}

/** <unk>, <s>, </s>, the 256 byte pieces, then `extra`: ids 259, 260, … */
function toyTokenizer(extra: [string, number][]): Llama2cTokenizer {
  const bytes: [string, number][] = Array.from({ length: 256 }, (_, b) => [`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`, 0]);
  return parseLlama2cTokenizer(tokenizerFile([['<unk>', 0], ['\n<s>\n', 0], ['\n</s>\n', 0], ...bytes, ...extra]), 'toy.bin');
}

describe('llama2.c tokenizer, hand-derived cases', () => {
  // ids: ' ' 259, 'a' 260, 'b' 261, 'c' 262, 'ab' 263, 'bc' 264, ' a' 265, 'aa' 266
  const tok = toyTokenizer([
    [' ', -1],
    ['a', -1],
    ['b', -1],
    ['c', -1],
    ['ab', 1],
    ['bc', 5],
    [' a', 0],
    ['aa', 2],
  ]);

  it('merges the best-scoring pair first', () => {
    // [' ', a, b, c]: pairs ' a' 0, 'ab' 1, 'bc' 5 → [' ', a, bc]; then ' a' 0 → [' a', bc]; 'abc' / ' abc' absent.
    expect(tok.encode('abc')).toEqual([265, 264]);
  });

  it('breaks ties leftmost, as run.c', () => {
    // [' ', a, a, a]: two equal 'aa' candidates (2) beat ' a' (0) → leftmost: [' ', aa, a]; ' aa', 'aaa' absent.
    // (Rightmost would give [' ', a, aa] → [' a', aa].)
    expect(tok.encode('aaa')).toEqual([259, 266, 260]);
    expect(tok.encode('aaaa')).toEqual([259, 266, 266]);
  });

  it('adds BOS, the dummy prefix only for non-empty text, and EOS when asked', () => {
    expect(tok.encode('')).toEqual([]);
    expect(tok.encode('', { bos: true, eos: true })).toEqual([1, 2]);
    expect(tok.encode('c', { bos: true, eos: true })).toEqual([1, 259, 262, 2]);
  });

  it('falls back to byte pieces (byte + 3) for unknown code points, and decodes them back', () => {
    // 'é' = C3 A9, '🙂' = F0 9F 99 82: not pieces
    expect(tok.encode('é🙂')).toEqual([259, 0xc3 + 3, 0xa9 + 3, 0xf0 + 3, 0x9f + 3, 0x99 + 3, 0x82 + 3]);
    expect(tok.decode([1, ...tok.encode('é🙂 abc')])).toBe('é🙂 abc');
  });

  it('strips one leading space only right after BOS; BOS/EOS print nothing', () => {
    expect(tok.decode([1, 265, 264])).toBe('abc');
    expect(tok.decode([265, 264])).toBe(' abc');
    expect(tok.decode([1, 259, 259, 260, 2])).toBe(' a');
    expect(tok.decode([260, 1, 265, 2, 265])).toBe('aa a');
  });

  it('rejects ids outside the vocabulary', () => {
    expect(() => tok.decode([3, 267])).toThrow(KvpackError);
    expect(() => tok.decode([-1])).toThrow(/outside the vocabulary/);
    expect(() => tok.decode([1.5])).toThrow(KvpackError);
  });
});

describe.skipIf(!HAVE_STORIES)(`tok512 (stories260K)${SKIP_STORIES}`, () => {
  it('encodes exactly as run.c', async () => {
    const tok = await loadLlama2cTokenizer(STORIES_TOK, 512);
    expect(tok.vocabSize).toBe(512);
    expect(RUNC.cases.length).toBeGreaterThanOrEqual(6);
    for (const c of RUNC.cases) expect(tok.encode(c.text, { bos: true }), JSON.stringify(c.text)).toEqual(c.ids);
  });

  it('decodes the oracle greedy ids to the oracle text, and encode → decode round-trips', async () => {
    const tok = await loadLlama2cTokenizer(STORIES_TOK, 512);
    const o = readOracle();
    expect(tok.decode(o.greedy_ids)).toBe(o.greedy_text);
    // run.c tokenizes the oracle text back to exactly the model's greedy ids (BOS included).
    expect(tok.encode(o.greedy_text, { bos: true })).toEqual(o.greedy_ids);
    for (const c of RUNC.cases) expect(tok.decode(tok.encode(c.text, { bos: true }))).toBe(c.text);
  });

  it('rejects a tokenizer whose size disagrees with the model, naming the file', async () => {
    const err = await loadLlama2cTokenizer(STORIES_TOK, 1000).catch((e) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect(err.code).toBe('config');
    expect(err.message).toContain(STORIES_TOK);
    expect(err.message).toContain('512 pieces');
    expect(err.message).toContain('1000');
    // The same file missing its last piece: 511 pieces for a 512-token model.
    const bytes = readFileSync(STORIES_TOK);
    let pos = 4;
    let lastStart = 4;
    while (pos < bytes.length) {
      lastStart = pos;
      pos += 8 + bytes.readInt32LE(pos + 4);
    }
    const short = join(tmp, 'tok511.bin');
    writeFileSync(short, bytes.subarray(0, lastStart));
    const e2 = await loadLlama2cTokenizer(short, 512).catch((e) => e);
    expect(e2).toBeInstanceOf(KvpackError);
    expect(e2.code).toBe('config');
    expect(e2.message).toContain(short);
    expect(e2.message).toContain('511 pieces');
  });

  it('rejects a tokenizer cut inside a piece, and a negative length', async () => {
    const bytes = readFileSync(STORIES_TOK);
    const cut = join(tmp, 'tok_cut.bin');
    writeFileSync(cut, bytes.subarray(0, bytes.length - 2));
    const e = await loadLlama2cTokenizer(cut, 512).catch((x) => x);
    expect(e).toBeInstanceOf(KvpackError);
    expect(e.code).toBe('truncated');
    expect(e.message).toContain(cut);
    const neg = Buffer.from(bytes);
    neg.writeInt32LE(-5, 4 + 4); // piece 0's length
    expect(() => parseLlama2cTokenizer(neg, 'neg.bin')).toThrow(/neg\.bin.*piece 0 has length -5/);
    const missing = await loadLlama2cTokenizer(join(tmp, 'nope.bin'), 512).catch((x) => x);
    expect(missing.code).toBe('io');
  });
});
