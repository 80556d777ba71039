import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { Tokenizer as HfTokenizerImpl } from '@huggingface/tokenizers';
import { KvpackError, check } from '@kvpack/core';
import type { Tokenizer } from '../types.js';

type Json = Record<string, unknown>;

/** Options of {@link HfTokenizer}. */
export interface HfTokenizerOptions {
  /** BOS id; default: the id of tokenizer_config.json's `bos_token`. */
  bosId?: number;
  /** EOS id; default: the id of tokenizer_config.json's `eos_token`. */
  eosId?: number;
  /** Name used in error messages (default "tokenizer.json"). */
  source?: string;
}

function tokenContent(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return undefined;
}

/** Ids above this are refused: a vocabulary that large is a corrupt file, not a model. */
const MAX_TOKEN_ID = 1 << 24;

/**
 * Checks that every id of a tokenizer.json names one piece, so that decoding is unambiguous:
 * `model.vocab` ids (object vocabularies of BPE / WordPiece / WordLevel) are integers in
 * [0, 2^24) and distinct; a Unigram `[piece, score]` list has no piece twice (ids are list
 * positions); `added_tokens` have distinct integer ids and distinct contents, and an added token
 * whose id is in the vocabulary has that piece's content.
 * @throws KvpackError('corrupt') naming the file, the id and both pieces.
 */
export function checkTokenizerIds(json: Json, source = 'tokenizer.json'): void {
  const model = json.model as Json;
  const pieceOf = new Map<number, string>();
  const vocab = model?.vocab;
  if (Array.isArray(vocab)) {
    const seen = new Map<string, number>();
    vocab.forEach((entry, id) => {
      const piece = Array.isArray(entry) ? entry[0] : undefined;
      check(typeof piece === 'string', 'corrupt', `${source}: model.vocab[${id}] is not a [piece, score] pair`);
      const prev = seen.get(piece);
      check(prev === undefined, 'corrupt', `${source}: model.vocab lists piece ${JSON.stringify(piece)} twice, as ids ${prev} and ${id}`);
      seen.set(piece, id);
      pieceOf.set(id, piece);
    });
  } else if (vocab !== undefined) {
    check(vocab !== null && typeof vocab === 'object', 'corrupt', `${source}: model.vocab is neither an object nor a list`);
    for (const [piece, id] of Object.entries(vocab as Json)) {
      check(
        Number.isInteger(id) && (id as number) >= 0 && (id as number) < MAX_TOKEN_ID,
        'corrupt',
        `${source}: model.vocab gives piece ${JSON.stringify(piece)} the id ${JSON.stringify(id)}, not an integer in [0, ${MAX_TOKEN_ID})`,
      );
      const prev = pieceOf.get(id as number);
      check(
        prev === undefined,
        'corrupt',
        `${source}: duplicate id ${id} in model.vocab: both ${JSON.stringify(prev)} and ${JSON.stringify(piece)} map to it, so decoding ${id} is ambiguous`,
      );
      pieceOf.set(id as number, piece);
    }
  }
  const added = json.added_tokens;
  if (added === undefined) return;
  check(Array.isArray(added), 'corrupt', `${source}: added_tokens is not a list`);
  const addedIds = new Map<number, string>();
  const addedContent = new Map<string, number>();
  added.forEach((t: unknown, i) => {
    const { id, content } = (t ?? {}) as Json;
    check(
      Number.isInteger(id) && (id as number) >= 0 && (id as number) < MAX_TOKEN_ID && typeof content === 'string',
      'corrupt',
      `${source}: added_tokens[${i}] needs an integer id in [0, ${MAX_TOKEN_ID}) and a string content, got ${JSON.stringify(t)}`,
    );
    const n = id as number;
    const c = content as string;
    const prev = addedIds.get(n);
    check(prev === undefined, 'corrupt', `${source}: duplicate id ${n} in added_tokens: both ${JSON.stringify(prev)} and ${JSON.stringify(c)}`);
    const prevId = addedContent.get(c);
    check(prevId === undefined, 'corrupt', `${source}: added_tokens lists ${JSON.stringify(c)} twice, as ids ${prevId} and ${n}`);
    const inVocab = pieceOf.get(n);
    check(
      inVocab === undefined || inVocab === c,
      'corrupt',
      `${source}: added token ${JSON.stringify(c)} has id ${n}, which model.vocab gives to ${JSON.stringify(inVocab)}, so decoding ${n} is ambiguous`,
    );
    addedIds.set(n, c);
    addedContent.set(c, n);
  });
}

/**
 * Finds a piece listed twice in the raw text of tokenizer.json's `model.vocab` object. JSON.parse keeps
 * only the last of duplicate keys, so the earlier id would silently lose its piece; this scan sees
 * them. A single pass over the text (strings, escapes, nesting); nothing else is checked here.
 * @returns the piece and its two ids, or null.
 */
export function findDuplicateVocabPiece(text: string): { piece: string; ids: [string, string] } | null {
  let i = 0;
  const n = text.length;
  const ws = () => {
    while (i < n && (text[i] === ' ' || text[i] === '\n' || text[i] === '\r' || text[i] === '\t')) i++;
  };
  const str = (): string => {
    const start = i; // at the opening quote
    i++;
    let plain = true;
    while (i < n && text[i] !== '"') {
      if (text[i] === '\\') {
        plain = false;
        i++;
      }
      i++;
    }
    i++;
    const raw = text.slice(start, i);
    if (plain) return raw.slice(1, -1);
    try {
      return JSON.parse(raw) as string;
    } catch {
      return raw;
    }
  };
  /** Skips one value; returns its raw text when it is a scalar. */
  const value = (path: string): string | undefined => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const seen = path === '.model.vocab' ? new Map<string, string>() : null;
      for (;;) {
        ws();
        if (text[i] === '}' || i >= n) {
          i++;
          return undefined;
        }
        if (text[i] === ',') {
          i++;
          continue;
        }
        const key = str();
        ws();
        i++; // ':'
        const v = value(`${path}.${key}`);
        if (seen) {
          const prev = seen.get(key);
          if (prev !== undefined) throw { piece: key, ids: [prev, v ?? '?'] };
          seen.set(key, v ?? '?');
        }
      }
    }
    if (c === '[') {
      i++;
      for (;;) {
        ws();
        if (text[i] === ']' || i >= n) {
          i++;
          return undefined;
        }
        if (text[i] === ',') {
          i++;
          continue;
        }
        value(`${path}[]`);
      }
    }
    if (c === '"') {
      str();
      return undefined;
    }
    const start = i;
    while (i < n && !',}] \n\r\t'.includes(text[i])) i++;
    if (i === start) i++; // malformed: make progress (JSON.parse reports it)
    return text.slice(start, i);
  };
  try {
    value('');
    return null;
  } catch (dup) {
    if (dup instanceof RangeError) throw new KvpackError('corrupt', `tokenizer.json nests too deeply to check (${dup.message})`, { cause: dup });
    return dup as { piece: string; ids: [string, string] };
  }
}

/**
 * A Hugging Face `tokenizer.json` (BPE, WordPiece, Unigram, WordLevel, with their normalizers,
 * pre-tokenizers and decoders) run by `@huggingface/tokenizers`, as a kvpack {@link Tokenizer}.
 *
 * `encode` never lets the tokenizer's post-processor add special tokens; BOS/EOS are added only when
 * asked. Special tokens written in the text (e.g. `<bos>`) are still recognised as added tokens.
 * `decode` keeps special tokens and cleans up spaces before punctuation only when
 * tokenizer_config.json sets `clean_up_tokenization_spaces: true` (transformers' current default).
 */
export class HfTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  private readonly tok: HfTokenizerImpl;
  private readonly source: string;

  /**
   * @param tokenizerJson parsed tokenizer.json
   * @param tokenizerConfig parsed tokenizer_config.json (or {})
   * @throws KvpackError('corrupt') when an id names two pieces (see {@link checkTokenizerIds});
   *         ('unsupported') when the library cannot build the tokenizer.
   */
  constructor(tokenizerJson: Json, tokenizerConfig: Json = {}, options: HfTokenizerOptions = {}) {
    this.source = options.source ?? 'tokenizer.json';
    check(tokenizerJson && typeof tokenizerJson === 'object' && tokenizerJson.model, 'corrupt', `${this.source}: no "model" section`);
    checkTokenizerIds(tokenizerJson, this.source);
    const json = { added_tokens: [], ...tokenizerJson } as Json;
    const model = json.model as Json;
    const config: Json = { ...tokenizerConfig };
    // WordLevel vocabularies name their unknown token in tokenizer.json only; the library reads it
    // from the config.
    if (config.unk_token === undefined && typeof model.unk_token === 'string') config.unk_token = model.unk_token;
    // transformers ≥ 4.45 defaults clean_up_tokenization_spaces to false (the library to true).
    config.clean_up_tokenization_spaces = tokenizerConfig.clean_up_tokenization_spaces === true;
    for (const k of ['bos_token', 'eos_token', 'unk_token', 'pad_token']) {
      const c = tokenContent(config[k]);
      if (c === undefined) delete config[k];
      else config[k] = c;
    }
    try {
      this.tok = new HfTokenizerImpl(json, config);
    } catch (e) {
      throw new KvpackError('unsupported', `${this.source}: @huggingface/tokenizers cannot build this tokenizer: ${(e as Error).message}`, { cause: e });
    }
    let maxId = -1;
    for (const id of this.tok.get_vocab(true).values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    const idOf = (k: string) => {
      const c = tokenContent(config[k]);
      return c === undefined ? undefined : this.tok.token_to_id(c);
    };
    this.bosId = options.bosId ?? idOf('bos_token');
    this.eosId = options.eosId ?? idOf('eos_token');
  }

  /**
   * Reads `tokenizer.json` (and `tokenizer_config.json` beside it, when present).
   * @param path a model directory or the tokenizer.json file
   * @throws KvpackError('io') when tokenizer.json is missing; ('corrupt') for invalid JSON, a piece
   *         listed twice in `model.vocab` (see {@link findDuplicateVocabPiece}) or an id naming two pieces.
   */
  static async fromFile(path: string, options: HfTokenizerOptions = {}): Promise<HfTokenizer> {
    const file = basename(path) === 'tokenizer.json' || path.endsWith('.json') ? path : join(path, 'tokenizer.json');
    check(existsSync(file), 'io', `no tokenizer.json at ${file}`);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (e) {
      throw new KvpackError('io', `cannot read ${file}: ${(e as Error).message}`, { cause: e });
    }
    const json = parseJsonText(text, file);
    const dup = findDuplicateVocabPiece(text);
    if (dup)
      throw new KvpackError(
        'corrupt',
        `${file}: model.vocab lists piece ${JSON.stringify(dup.piece)} twice, with ids ${dup.ids[0]} and ${dup.ids[1]}; JSON keeps only the last, so id ${dup.ids[0]} would decode to nothing`,
      );
    const cfgFile = join(dirname(file), 'tokenizer_config.json');
    const cfg = existsSync(cfgFile) ? await readHfJson(cfgFile) : {};
    return new HfTokenizer(json, cfg, { source: file, ...options });
  }

  /**
   * Token ids of `text`, with BOS / EOS only when asked.
   * @throws KvpackError('config') when BOS/EOS is asked for but unknown.
   */
  encode(text: string, options: { bos?: boolean; eos?: boolean } = {}): number[] {
    const enc = this.tok.encode(text, { add_special_tokens: false });
    const ids = enc.ids as number[];
    const bad = ids.findIndex((x) => !Number.isInteger(x));
    if (bad >= 0)
      throw new KvpackError('unsupported', `${this.source}: token "${enc.tokens[bad]}" has no id and the tokenizer defines no unknown token`);
    if (options.bos) {
      check(this.bosId !== undefined, 'config', `${this.source}: BOS was requested but the tokenizer has no bos_token`);
      ids.unshift(this.bosId);
    }
    if (options.eos) {
      check(this.eosId !== undefined, 'config', `${this.source}: EOS was requested but the tokenizer has no eos_token`);
      ids.push(this.eosId);
    }
    return ids;
  }

  /** Text of token ids (special tokens kept). */
  decode(ids: number[]): string {
    return this.tok.decode(ids, { skip_special_tokens: false });
  }

  /** The token string of an id (undefined when out of range). */
  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }
}

/** Reads and parses a JSON file. @throws KvpackError('io' | 'corrupt') naming the file. */
export async function readHfJson(file: string): Promise<Json> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new KvpackError('io', `cannot read ${file}: ${(e as Error).message}`, { cause: e });
  }
  return parseJsonText(text, file);
}

function parseJsonText(text: string, file: string): Json {
  try {
    return JSON.parse(text) as Json;
  } catch (e) {
    throw new KvpackError('corrupt', `${file} is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
}
