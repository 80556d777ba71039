import { KvpackError, check } from '@kvpack/core';
import { HfTokenizer } from '../hf/tokenizer.js';
import type { Tokenizer } from '../types.js';

/** llama.cpp token types (`enum llama_token_type`, tokenizer.ggml.token_type). */
export const GGUF_TOKEN_TYPE = { NORMAL: 1, UNKNOWN: 2, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5, BYTE: 6 } as const;

/** Vocabulary of a SentencePiece-style ("llama") tokenizer. */
export interface SpmVocab {
  tokens: string[];
  scores: ArrayLike<number>;
  /** llama.cpp token types; default all NORMAL, with `<0xXX>` pieces treated as bytes. */
  tokenTypes?: ArrayLike<number>;
  bosId?: number;
  eosId?: number;
  unkId?: number;
  /** Prepend a space ("▁") to the text, as SentencePiece's dummy prefix. Default true. */
  addSpacePrefix?: boolean;
}

const SPACE = '\u2581'; // ▁

/** Max-heap entry: a candidate merge of symbol `left` with its right neighbour. */
interface Bigram {
  left: number;
  right: number;
  score: number;
  /** Combined length at push time; a mismatch later means the entry is stale. */
  size: number;
}

/** Higher score first; equal scores: leftmost first (llama.cpp llm_bigram_spm::comparator). */
function before(a: Bigram, b: Bigram): boolean {
  return a.score > b.score || (a.score === b.score && a.left < b.left);
}

class BigramHeap {
  private readonly h: Bigram[] = [];
  get size(): number {
    return this.h.length;
  }
  push(x: Bigram): void {
    const h = this.h;
    h.push(x);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(h[i], h[p])) break;
      [h[i], h[p]] = [h[p], h[i]];
      i = p;
    }
  }
  pop(): Bigram {
    const h = this.h;
    const top = h[0];
    const last = h.pop()!;
    if (h.length) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && before(h[l], h[m])) m = l;
        if (r < h.length && before(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
}

/**
 * SentencePiece-style BPE over scored pieces, as llama.cpp's `llm_tokenizer_spm` and llama2.c's
 * `encode` (run.c): the text (with a leading space when `addSpacePrefix`) has spaces replaced by
 * "▁" and is split into UTF-8 characters; repeatedly the adjacent pair whose concatenation is a
 * piece with the highest score is merged (ties: leftmost); characters that are no piece fall back
 * to their UTF-8 bytes as `<0xXX>` pieces (or the unknown id when those are absent).
 * Special tokens written in the text are not parsed; pass `bos`/`eos` instead.
 */
export class SpmTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  private readonly ids = new Map<string, number>();
  private readonly byteIds = new Int32Array(256).fill(-1);
  /** Byte value of byte-fallback pieces, −1 for others. */
  private readonly byteOf: Int16Array;
  private readonly control: Uint8Array;
  private readonly unkId: number | undefined;
  private readonly addSpacePrefix: boolean;

  constructor(private readonly vocab: SpmVocab) {
    const n = vocab.tokens.length;
    check(vocab.scores.length === n, 'corrupt', `tokenizer: ${n} pieces but ${vocab.scores.length} scores`);
    check(!vocab.tokenTypes || vocab.tokenTypes.length === n, 'corrupt', `tokenizer: ${n} pieces but ${vocab.tokenTypes?.length} token types`);
    this.vocabSize = n;
    this.bosId = vocab.bosId;
    this.eosId = vocab.eosId;
    this.unkId = vocab.unkId;
    this.addSpacePrefix = vocab.addSpacePrefix ?? true;
    this.byteOf = new Int16Array(n).fill(-1);
    this.control = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const t = vocab.tokens[i];
      const type = vocab.tokenTypes?.[i] ?? GGUF_TOKEN_TYPE.NORMAL;
      const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(t);
      if (m && (type === GGUF_TOKEN_TYPE.BYTE || !vocab.tokenTypes)) {
        const b = parseInt(m[1], 16);
        this.byteOf[i] = b;
        if (this.byteIds[b] < 0) this.byteIds[b] = i;
        continue;
      }
      if (type === GGUF_TOKEN_TYPE.CONTROL || type === GGUF_TOKEN_TYPE.UNKNOWN || type === GGUF_TOKEN_TYPE.UNUSED) {
        this.control[i] = 1;
        continue;
      }
      if (!this.ids.has(t)) this.ids.set(t, i);
    }
  }

  encode(text: string, options: { bos?: boolean; eos?: boolean } = {}): number[] {
    const out: number[] = [];
    if (options.bos) {
      check(this.bosId !== undefined, 'config', 'tokenizer: BOS was requested but the vocabulary has no BOS id');
      out.push(this.bosId);
    }
    if (text.length > 0) {
      const s = (this.addSpacePrefix ? ' ' + text : text).replaceAll(' ', SPACE);
      const sym = Array.from(s); // UTF-8 characters (code points)
      const n = sym.length;
      const prev = new Int32Array(n);
      const next = new Int32Array(n);
      for (let i = 0; i < n; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
      }
      const heap = new BigramHeap();
      const tryAdd = (l: number, r: number) => {
        if (l < 0 || r < 0) return;
        const id = this.ids.get(sym[l] + sym[r]);
        if (id === undefined) return;
        heap.push({ left: l, right: r, score: this.vocab.scores[id], size: sym[l].length + sym[r].length });
      };
      for (let i = 1; i < n; i++) tryAdd(i - 1, i);
      while (heap.size) {
        const b = heap.pop();
        const l = b.left;
        const r = b.right;
        // Stale: a side was merged away or changed since this entry was pushed.
        if (sym[l].length === 0 || sym[r].length === 0 || next[l] !== r || sym[l].length + sym[r].length !== b.size) continue;
        sym[l] += sym[r];
        sym[r] = '';
        next[l] = next[r];
        if (next[r] >= 0) prev[next[r]] = l;
        tryAdd(prev[l], l);
        tryAdd(l, next[l]);
      }
      for (let i = 0; i >= 0; i = next[i]) {
        const id = this.ids.get(sym[i]);
        if (id !== undefined) {
          out.push(id);
          continue;
        }
        for (const byte of new TextEncoder().encode(sym[i])) {
          const bid = this.byteIds[byte];
          if (bid >= 0) out.push(bid);
          else if (this.unkId !== undefined) out.push(this.unkId);
          else throw new KvpackError('unsupported', `tokenizer: "${sym[i]}" is no piece, the vocabulary has no <0x${byte.toString(16).toUpperCase().padStart(2, '0')}> byte piece and no unknown id`);
        }
      }
    }
    if (options.eos) {
      check(this.eosId !== undefined, 'config', 'tokenizer: EOS was requested but the vocabulary has no EOS id');
      out.push(this.eosId);
    }
    return out;
  }

  /**
   * Concatenates pieces ("▁" → space, `<0xXX>` → that byte, control tokens → nothing) and decodes
   * the bytes as UTF-8. The dummy-prefix space before the first piece is dropped, as SentencePiece does.
   */
  decode(ids: number[]): string {
    const bytes: number[] = [];
    const enc = new TextEncoder();
    let first = true;
    for (const id of ids) {
      check(Number.isInteger(id) && id >= 0 && id < this.vocabSize, 'shape', `tokenizer: id ${id} is out of range [0, ${this.vocabSize})`);
      if (this.control[id]) continue;
      if (this.byteOf[id] >= 0) {
        bytes.push(this.byteOf[id]);
        first = false;
        continue;
      }
      let piece = this.vocab.tokens[id].replaceAll(SPACE, ' ');
      if (first && this.addSpacePrefix && piece.startsWith(' ')) piece = piece.slice(1);
      first = false;
      for (const b of enc.encode(piece)) bytes.push(b);
    }
    return new TextDecoder('utf-8').decode(new Uint8Array(bytes));
  }
}

/** Byte-level BPE pre-tokenizer regexes of llama.cpp (`llama-vocab.cpp`), by `tokenizer.ggml.pre`. */
const PRE_REGEX: Record<string, string | null> = {
  // GPT-2's own pattern (ByteLevel with use_regex = true).
  default: null,
  'gpt-2': null,
  gpt2: null,
  llama3: String.raw`(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`,
  qwen2: String.raw`(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`,
};
const PRE_ALIASES: Record<string, string> = {
  'llama-bpe': 'llama3',
  'llama-v3': 'llama3',
  'smaug-bpe': 'llama3',
  'deepseek-r1-qwen': 'qwen2',
};

/** Vocabulary of a byte-level BPE ("gpt2") tokenizer. */
export interface Gpt2Vocab {
  tokens: string[];
  merges: string[];
  tokenTypes?: ArrayLike<number>;
  /** tokenizer.ggml.pre; default "default" (GPT-2's pattern). */
  pre?: string;
  bosId?: number;
  eosId?: number;
}

/**
 * A byte-level BPE ("gpt2") GGUF vocabulary, run by `@huggingface/tokenizers` from an equivalent
 * tokenizer.json: BPE model over `tokens`/`merges`, the pre-tokenizer regex llama.cpp uses for
 * `tokenizer.ggml.pre` (GPT-2, Llama 3, Qwen2), ByteLevel byte↔unicode mapping, and control /
 * user-defined tokens as added tokens.
 * @throws KvpackError('unsupported') for another `pre` type.
 */
export function gpt2Tokenizer(v: Gpt2Vocab, source = 'GGUF tokenizer'): Tokenizer {
  const preName = PRE_ALIASES[v.pre ?? 'default'] ?? v.pre ?? 'default';
  if (!(preName in PRE_REGEX))
    throw new KvpackError(
      'unsupported',
      `${source}: pre-tokenizer "${v.pre}" is not supported (kvpack knows ${[...Object.keys(PRE_REGEX), ...Object.keys(PRE_ALIASES)].join(', ')})`,
    );
  const regex = PRE_REGEX[preName];
  const vocab: Record<string, number> = {};
  const added: unknown[] = [];
  v.tokens.forEach((t, id) => {
    const type = v.tokenTypes?.[id] ?? GGUF_TOKEN_TYPE.NORMAL;
    if (type === GGUF_TOKEN_TYPE.CONTROL || type === GGUF_TOKEN_TYPE.USER_DEFINED)
      added.push({ id, content: t, special: type === GGUF_TOKEN_TYPE.CONTROL, single_word: false, lstrip: false, rstrip: false, normalized: false });
    if (!Object.hasOwn(vocab, t)) vocab[t] = id; // not `in`: tokens such as "constructor" are no prototype keys
  });
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: regex === null };
  const json = {
    version: '1.0',
    added_tokens: added,
    normalizer: null,
    pre_tokenizer:
      regex === null
        ? byteLevel
        : { type: 'Sequence', pretokenizers: [{ type: 'Split', pattern: { Regex: regex }, behavior: 'Isolated', invert: false }, byteLevel] },
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', vocab, merges: v.merges, ignore_merges: preName === 'llama3', byte_fallback: false, dropout: null, unk_token: null },
  };
  return new HfTokenizer(json, {}, { bosId: v.bosId, eosId: v.eosId, source });
}
