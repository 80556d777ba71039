import { readFile } from 'node:fs/promises';
import { KvpackError, check } from '@kvpack/core';
import type { Tokenizer } from '../types.js';
import { fmtBytes } from '../bounds.js';

/** Bytes as a JS string with one char per byte (0..255), so that map lookups compare raw bytes. */
function bytesKey(b: Uint8Array): string {
  let s = '';
  for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));
  return s;
}

/** The bytes of a {@link bytesKey} string. */
const keyBytes = (k: string): Uint8Array => Uint8Array.from(k, (c) => c.charCodeAt(0));

const utf8 = new TextEncoder();

const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>$/;

/** Merge candidates scoring at or below this never merge (run.c starts its search at -1e10). */
const NO_MERGE = -1e10;

/**
 * The tokenizer of llama2.c models: a SentencePiece BPE vocabulary exported by llama2.c's
 * `tokenizer.py` (`.bin`: int32 max_token_length, then per piece float32 score, int32 byte length,
 * bytes). Ids 0, 1, 2 are `<unk>`, `<s>` (BOS), `</s>` (EOS); ids 3..258 are the byte pieces
 * `<0x00>`..`<0xFF>` used for byte fallback.
 *
 * `encode` and `decode` follow karpathy/llama2.c `run.c` (`encode()`, `decode()`).
 */
export class Llama2cTokenizer implements Tokenizer {
  readonly bosId = 1;
  readonly eosId = 2;
  /** Pieces as byte strings (one char per byte). */
  private readonly keys: string[];
  private readonly ids = new Map<string, number>();
  /** byte value → id of its `<0xXX>` piece, or -1. */
  private readonly byteIds = new Int32Array(256).fill(-1);
  /** id → byte value for `<0xXX>` pieces, else -1. */
  private readonly byteOf: Int16Array;

  /**
   * @param pieces each piece's UTF-8 bytes, by id
   * @param scores each piece's merge score (higher merges first), by id
   * @param maxTokenLength the longest piece, bytes (from the file header)
   */
  constructor(
    pieces: Uint8Array[],
    readonly scores: Float32Array,
    readonly maxTokenLength: number,
  ) {
    check(pieces.length === scores.length, 'shape', `llama2.c tokenizer: ${pieces.length} pieces but ${scores.length} scores`);
    check(pieces.length >= 3, 'config', `llama2.c tokenizer: ${pieces.length} pieces; ids 0, 1, 2 must be <unk>, <s>, </s>`);
    this.keys = pieces.map(bytesKey);
    this.byteOf = new Int16Array(pieces.length).fill(-1);
    this.keys.forEach((k, id) => {
      if (!this.ids.has(k)) this.ids.set(k, id);
      const m = BYTE_PIECE.exec(k);
      if (m) {
        const byte = parseInt(m[1], 16);
        this.byteOf[id] = byte;
        if (this.byteIds[byte] < 0) this.byteIds[byte] = id;
      }
    });
  }

  get vocabSize(): number {
    return this.keys.length;
  }

  /** The bytes of one piece. @throws KvpackError('shape') for an id outside [0, vocab). */
  piece(id: number): Uint8Array {
    this.checkId(id);
    return keyBytes(this.keys[id]);
  }

  /** Id of a piece given as text (UTF-8), or undefined. */
  pieceId(text: string): number | undefined {
    return this.ids.get(bytesKey(utf8.encode(text)));
  }

  private checkId(id: number): void {
    check(Number.isInteger(id) && id >= 0 && id < this.keys.length, 'shape', `token id ${id} is outside the vocabulary [0, ${this.keys.length})`);
  }

  /** Ids for bytes that have no piece: byte fallback to `<0xXX>` (run.c: byte + 3), else `<unk>`. */
  private fallback(bytes: Uint8Array, out: number[]): void {
    for (const b of bytes) out.push(this.byteIds[b] >= 0 ? this.byteIds[b] : 0);
  }

  /**
   * Encodes text as run.c `encode()` does: optional BOS; a dummy-prefix `" "` piece when the text is
   * non-empty; each UTF-8 code point as its piece when the vocabulary has it, else byte fallback;
   * then repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece
   * (leftmost on ties) until no pair merges; optional EOS.
   * @param options bos / eos: prepend BOS (1) / append EOS (2); both default false.
   */
  encode(text: string, options: { bos?: boolean; eos?: boolean } = {}): number[] {
    const toks: number[] = [];
    if (options.bos) toks.push(this.bosId);
    const bytes = utf8.encode(text);
    if (bytes.length > 0) {
      const space = this.ids.get(' ');
      if (space !== undefined) toks.push(space);
      else this.fallback(utf8.encode(' '), toks);
    }
    // Code points: a byte that is not a continuation byte (10xxxxxx) starts a new one; at most 4 bytes.
    for (let i = 0; i < bytes.length; ) {
      let j = i + 1;
      while (j < bytes.length && (bytes[j] & 0xc0) === 0x80 && j - i < 4) j++;
      const cp = bytes.subarray(i, j);
      const id = this.ids.get(bytesKey(cp));
      if (id !== undefined) toks.push(id);
      else this.fallback(cp, toks);
      i = j;
    }
    this.merge(toks);
    if (options.eos) toks.push(this.eosId);
    return toks;
  }

  /** BPE merges in place: best-scoring adjacent pair first (leftmost on ties), as run.c. */
  private merge(toks: number[]): void {
    // Score and id of merging toks[i], toks[i + 1]; recomputed only next to a merge.
    const pairScore: number[] = [];
    const pairId: number[] = [];
    const evalPair = (i: number) => {
      const id = this.ids.get(this.keys[toks[i]] + this.keys[toks[i + 1]]);
      pairId[i] = id ?? -1;
      pairScore[i] = id === undefined ? -Infinity : this.scores[id];
    };
    for (let i = 0; i + 1 < toks.length; i++) evalPair(i);
    for (;;) {
      let best = NO_MERGE;
      let at = -1;
      for (let i = 0; i + 1 < toks.length; i++) {
        if (pairId[i] >= 0 && pairScore[i] > best) {
          best = pairScore[i];
          at = i;
        }
      }
      if (at < 0) return;
      toks[at] = pairId[at];
      toks.splice(at + 1, 1);
      pairScore.splice(at + 1, 1);
      pairId.splice(at + 1, 1);
      if (at + 1 < toks.length) evalPair(at);
      else {
        pairScore.length = toks.length - 1;
        pairId.length = toks.length - 1;
      }
      if (at > 0) evalPair(at - 1);
    }
  }

  /**
   * Decodes ids as run.c `decode()` does, concatenated: a piece following BOS loses one leading
   * space; `<0xXX>` pieces are raw bytes; the bytes are then read as UTF-8 (invalid sequences become
   * U+FFFD). BOS and EOS produce no text (run.c never prints them). Unlike run.c's `safe_printf`, no
   * byte is dropped.
   * @throws KvpackError('shape') for an id outside [0, vocab).
   */
  decode(ids: number[]): string {
    const out: number[] = [];
    let prev = -1;
    for (const id of ids) {
      this.checkId(id);
      if (id !== this.bosId && id !== this.eosId) {
        const byte = this.byteOf[id];
        if (byte >= 0) out.push(byte);
        else {
          const k = this.keys[id];
          for (let i = prev === this.bosId && k.charCodeAt(0) === 0x20 ? 1 : 0; i < k.length; i++) out.push(k.charCodeAt(i));
        }
      }
      prev = id;
    }
    return new TextDecoder('utf-8').decode(Uint8Array.from(out));
  }
}

/**
 * Parses a llama2.c tokenizer `.bin` (every piece to the end of the file).
 * @param file the file name, for messages
 * Every length is checked against the bytes left before anything is allocated for it.
 * @throws KvpackError('truncated') when a piece runs past the end; KvpackError('corrupt') for a
 *   negative length or one above max_token_length, and for a max_token_length that is not positive
 *   or longer than the file could hold.
 */
export function parseLlama2cTokenizer(bytes: Uint8Array, file = '<buffer>'): Llama2cTokenizer {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  check(bytes.byteLength >= 4, 'truncated', `${file}: llama2.c tokenizer is ${bytes.byteLength} bytes, too short for its 4-byte header`);
  const maxLen = dv.getInt32(0, true);
  check(maxLen > 0, 'corrupt', `${file}: llama2.c tokenizer max_token_length = ${maxLen} must be positive`);
  // run.c allocates buffers of 2 · max_token_length: a value no piece of this file can reach is corrupt.
  check(
    maxLen <= bytes.byteLength - 12,
    'corrupt',
    () => `${file}: header max_token_length = ${maxLen} needs a piece of at least ${fmtBytes(maxLen + 12)} with its headers but the file has ${fmtBytes(bytes.byteLength)}`,
  );
  const pieces: Uint8Array[] = [];
  const scores: number[] = [];
  let pos = 4;
  while (pos < bytes.byteLength) {
    const id = pieces.length;
    check(pos + 8 <= bytes.byteLength, 'truncated', `${file}: truncated llama2.c tokenizer: piece ${id} header needs bytes ${pos}..${pos + 8}, file has ${bytes.byteLength}`);
    const score = dv.getFloat32(pos, true);
    const len = dv.getInt32(pos + 4, true);
    check(len >= 0 && len <= maxLen, 'corrupt', `${file}: llama2.c tokenizer piece ${id} has length ${len}, outside [0, max_token_length = ${maxLen}]`);
    pos += 8;
    check(pos + len <= bytes.byteLength, 'truncated', `${file}: truncated llama2.c tokenizer: piece ${id} needs ${len} bytes at ${pos}, file has ${bytes.byteLength - pos}`);
    pieces.push(bytes.slice(pos, pos + len));
    scores.push(score);
    pos += len;
  }
  return new Llama2cTokenizer(pieces, Float32Array.from(scores), maxLen);
}

/**
 * Reads a llama2.c tokenizer file and checks it has one piece per model token.
 * @param vocabSize the model's vocabulary size (the file does not store its own; run.c trusts the model's)
 * @throws KvpackError('config') naming the file when its piece count differs from `vocabSize`;
 *   KvpackError('io' | 'truncated' | 'corrupt') as {@link parseLlama2cTokenizer}.
 */
export async function loadLlama2cTokenizer(path: string, vocabSize?: number): Promise<Llama2cTokenizer> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new KvpackError('io', `cannot read llama2.c tokenizer ${path}: ${(e as Error).message}`, { cause: e });
  }
  const tok = parseLlama2cTokenizer(bytes, path);
  if (vocabSize !== undefined)
    check(
      tok.vocabSize === vocabSize,
      'config',
      `${path}: the tokenizer has ${tok.vocabSize} pieces but the model's vocabulary has ${vocabSize} tokens; use the tokenizer exported for this model`,
    );
  return tok;
}
