import { KvpackError, check } from '@kvpack/core';
import type { LlamaConfig, Tokenizer } from './types.js';
import {
  HfTokenizer,
  LlamaWeightsBuilder,
  SafetensorsFile,
  checkHfHeaders,
  disposeLlamaWeights,
  findDuplicateVocabPiece,
  hfSlotOf,
  hfTensorName,
  parseHfConfig,
  type HfConfigOptions,
  type HfShards,
} from './hf/index.js';
import { ggufTokenizer, loadGgufModelFromBytes, readGgufHeaderFromBytes } from './gguf/index.js';
import { LLAMA2C_MAGIC, parseLlama2cCheckpoint, parseLlama2cTokenizer, readLlama2cHeader } from './llama2c/index.js';
import type { LoadedModel } from './load.js';

/**
 * Bytes as a page or a server has them: a buffer or a view of one, a Blob (a File dropped on a page),
 * a fetch Response, or a stream of chunks (a Response body). Streams and Responses are read to the end
 * once, chunk by chunk.
 */
export type ByteSource = ArrayBuffer | ArrayBufferView | Blob | Response | ReadableStream<Uint8Array>;

/** Options of {@link readByteSource}. */
export interface ReadBytesOptions {
  /** Name of the source, for messages (a file name or URL). */
  name?: string;
  /** Called as chunks of a stream arrive: bytes so far and, when known (Content-Length), the total. */
  onProgress?: (loaded: number, total: number | undefined) => void;
}

const isResponse = (x: unknown): x is Response => typeof Response !== 'undefined' && x instanceof Response;
const isBlob = (x: unknown): x is Blob => typeof Blob !== 'undefined' && x instanceof Blob;
const isStream = (x: unknown): x is ReadableStream<Uint8Array> => typeof ReadableStream !== 'undefined' && x instanceof ReadableStream;

async function readStream(stream: ReadableStream<Uint8Array>, total: number | undefined, opts: ReadBytesOptions): Promise<Uint8Array> {
  const reader = stream.getReader();
  // With a known length the chunks go straight into one buffer; otherwise they are joined at the end.
  let out = total !== undefined ? new Uint8Array(total) : undefined;
  const parts: Uint8Array[] = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (out && loaded + value.length <= out.length) out.set(value, loaded);
    else {
      if (out) parts.push(out.subarray(0, loaded));
      out = undefined;
      parts.push(value);
    }
    loaded += value.length;
    opts.onProgress?.(loaded, total);
  }
  if (out) return loaded === out.length ? out : out.subarray(0, loaded);
  const joined = new Uint8Array(loaded);
  let at = 0;
  for (const p of parts) {
    joined.set(p, at);
    at += p.length;
  }
  return joined;
}

/**
 * Reads a {@link ByteSource} into one Uint8Array (a view of the same memory for buffers and views).
 * @throws KvpackError('io') for a Response that is not ok (naming its URL and status) or whose body
 *   was already read; ('unsupported') for anything that is not a byte source.
 */
export async function readByteSource(src: ByteSource, opts: ReadBytesOptions = {}): Promise<Uint8Array> {
  if (src instanceof Uint8Array) return src;
  if (src instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && (src as unknown) instanceof SharedArrayBuffer))
    return new Uint8Array(src as ArrayBuffer);
  if (ArrayBuffer.isView(src)) return new Uint8Array(src.buffer, src.byteOffset, src.byteLength);
  if (isResponse(src)) {
    const name = opts.name ?? src.url ?? 'response';
    check(src.ok, 'io', `${name}: HTTP ${src.status} ${src.statusText}`.trim());
    check(!src.bodyUsed, 'io', `${name}: the response body was already read`);
    const len = Number(src.headers.get('content-length'));
    const total = Number.isFinite(len) && len > 0 && !src.headers.get('content-encoding') ? len : undefined;
    if (!src.body) return new Uint8Array(await src.arrayBuffer());
    return readStream(src.body, total, opts);
  }
  if (isBlob(src)) return readStream(src.stream() as ReadableStream<Uint8Array>, src.size, opts);
  if (isStream(src)) return readStream(src, undefined, opts);
  throw new KvpackError('unsupported', `${opts.name ?? 'model source'}: expected an ArrayBuffer, typed array, Blob, Response or ReadableStream`);
}

const GGUF_MAGIC = 0x46554747; // "GGUF" little-endian

/**
 * What a file's bytes hold, from their first bytes: `gguf` ("GGUF"), `llama2c` (llama2.c "ak42", or a
 * version 0 checkpoint, which has no magic: assumed for a `.bin` name), `safetensors` (a plausible
 * header length then `{`, or a `.safetensors` name), `json` (text starting with `{`), else undefined.
 */
export function sniffModelBytes(bytes: Uint8Array, name = ''): 'gguf' | 'llama2c' | 'safetensors' | 'json' | undefined {
  if (bytes.length >= 4) {
    const word = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(0, true);
    if (word === GGUF_MAGIC) return 'gguf';
    if (word === LLAMA2C_MAGIC) return 'llama2c';
  }
  if (bytes.length >= 9 && bytes[8] === 0x7b) {
    const n = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigUint64(0, true);
    if (n > 1n && n <= BigInt(bytes.length - 8)) return 'safetensors';
  }
  let i = 0;
  while (i < bytes.length && i < 64 && (bytes[i] === 0x20 || bytes[i] === 0x0a || bytes[i] === 0x0d || bytes[i] === 0x09 || bytes[i] === 0xef || bytes[i] === 0xbb || bytes[i] === 0xbf)) i++;
  if (bytes[i] === 0x7b) return 'json';
  if (/\.bin$/i.test(name)) return 'llama2c';
  if (/\.safetensors$/i.test(name)) return 'safetensors'; // damaged: its loader says how
  return undefined;
}

function parseJson(bytes: Uint8Array, name: string): Record<string, unknown> {
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (e) {
    throw new KvpackError('corrupt', `${name} is not valid JSON: ${(e as Error).message}`, { cause: e });
  }
  check(raw !== null && typeof raw === 'object' && !Array.isArray(raw), 'corrupt', `${name} is not a JSON object`);
  return raw as Record<string, unknown>;
}

/** Options of {@link loadTokenizerFromBytes}. */
export interface TokenizerBytesOptions {
  /** File name, for messages and to tell a llama2.c tokenizer (`.bin`). */
  name?: string;
  /** Model vocabulary size: a tokenizer with more ids is refused. */
  vocabSize?: number;
  /** tokenizer_config.json beside a tokenizer.json (special tokens, clean-up). */
  tokenizerConfig?: ByteSource;
  /** BOS / EOS ids (from the model's config.json), for tokenizer.json. */
  bosId?: number;
  eosId?: number;
}

/**
 * Loads a tokenizer from bytes: a tokenizer.json (Hugging Face), a GGUF file's metadata, or a llama2.c
 * tokenizer .bin — told apart by their first bytes.
 * @throws KvpackError('corrupt') for invalid JSON, a piece listed twice, a bad tokenizer .bin;
 *   ('config') for more ids than `vocabSize`.
 */
export async function loadTokenizerFromBytes(src: ByteSource, options: TokenizerBytesOptions = {}): Promise<Tokenizer> {
  const name = options.name ?? 'tokenizer';
  const bytes = await readByteSource(src, { name });
  const kind = sniffModelBytes(bytes, name);
  let tok: Tokenizer;
  if (kind === 'json') {
    const text = new TextDecoder('utf-8').decode(bytes);
    const json = parseJson(bytes, name);
    const dup = findDuplicateVocabPiece(text);
    if (dup)
      throw new KvpackError(
        'corrupt',
        `${name}: model.vocab lists piece ${JSON.stringify(dup.piece)} twice, with ids ${dup.ids[0]} and ${dup.ids[1]}; JSON keeps only the last, so id ${dup.ids[0]} would decode to nothing`,
      );
    const cfg = options.tokenizerConfig
      ? parseJson(await readByteSource(options.tokenizerConfig, { name: 'tokenizer_config.json' }), 'tokenizer_config.json')
      : {};
    tok = new HfTokenizer(json as never, cfg as never, { source: name, bosId: options.bosId, eosId: options.eosId });
  } else if (kind === 'gguf') {
    tok = ggufTokenizer(await readGgufHeaderFromBytes(bytes, name));
  } else {
    check(kind !== 'safetensors', 'config', `${name} is a safetensors weights file, not a tokenizer`);
    tok = parseLlama2cTokenizer(bytes, name);
  }
  if (options.vocabSize !== undefined)
    check(
      tok.vocabSize <= options.vocabSize,
      'config',
      `${name}: the tokenizer has ${tok.vocabSize} tokens but the model's vocabulary has ${options.vocabSize}; use the tokenizer exported for this model`,
    );
  return tok;
}

/**
 * A model's files by name, as bytes: one of
 * - a llama2.c checkpoint (`*.bin`) and its tokenizer (`tokenizer.bin` or `tok{V}.bin`);
 * - a GGUF file (`*.gguf`);
 * - a Hugging Face model: `config.json`, `model.safetensors` or `model.safetensors.index.json` and the
 *   shards it names, optionally `tokenizer.json` and `tokenizer_config.json`.
 * A single source (not a map) is a GGUF file or a llama2.c checkpoint without tokenizer.
 */
export type ModelFiles = Record<string, ByteSource>;

/** Options of {@link loadModelFromBytes} and {@link loadModelFromUrl}. */
export interface ModelBytesOptions extends HfConfigOptions {
  /** Called as bytes arrive: the file, bytes so far and its total when known. */
  onProgress?: (file: string, loaded: number, total: number | undefined) => void;
}

async function loadHfFromFiles(files: Map<string, () => Promise<Uint8Array>>, where: string, options: ModelBytesOptions): Promise<LoadedModel> {
  const get = async (n: string) => {
    const f = files.get(n);
    check(f, 'io', `${where}: no ${n}`);
    return f();
  };
  const configName = 'config.json';
  const cfg: LlamaConfig = parseHfConfig((parseJson(await get(configName), configName)) as never, configName, options);
  let tokenizer: Tokenizer | undefined;
  if (files.has('tokenizer.json')) {
    const tc = files.get('tokenizer_config.json');
    tokenizer = await loadTokenizerFromBytes(await get('tokenizer.json'), {
      name: 'tokenizer.json',
      vocabSize: cfg.vocabSize,
      bosId: cfg.bosId,
      eosId: cfg.eosId,
      ...(tc ? { tokenizerConfig: await tc() } : {}),
    });
  }
  const indexName = 'model.safetensors.index.json';
  let shards: HfShards;
  if (files.has(indexName)) {
    const idx = parseJson(await get(indexName), indexName);
    const wm = idx.weight_map as Record<string, unknown> | undefined;
    check(wm && typeof wm === 'object', 'corrupt', `${indexName}: no "weight_map" object`);
    const weightMap = new Map<string, string>();
    const names: string[] = [];
    for (const [tensor, shard] of Object.entries(wm)) {
      check(typeof shard === 'string' && shard.length > 0 && !/[\\/]/.test(shard), 'corrupt', `${indexName}: weight_map["${tensor}"] is not a file name`);
      weightMap.set(tensor, shard);
      if (!names.includes(shard)) names.push(shard);
    }
    for (const n of names) check(files.has(n), 'io', `shard "${n}" listed in ${indexName} is missing from ${where}`);
    shards = { files: names, weightMap };
  } else {
    const single = [...files.keys()].filter((n) => n.endsWith('.safetensors'));
    check(single.length === 1, 'io', `${where}: expected model.safetensors (or model.safetensors.index.json and its shards), found ${single.length ? single.join(', ') : 'no .safetensors file'}`);
    shards = { files: single };
  }
  // Shards are read and parsed one after another; each one's bytes are dropped once its tensors are uploaded.
  const b = new LlamaWeightsBuilder(cfg, configName);
  try {
    const heads: SafetensorsFile[] = [];
    for (const n of shards.files) heads.push(await SafetensorsFile.fromBytes(await get(n), n));
    checkHfHeaders(where, cfg, shards, heads, configName);
    for (let i = 0; i < heads.length; i++) {
      const f = heads[i];
      for (const name of f.names()) {
        const slot = hfSlotOf(name);
        if (!slot || (slot === 'classifier' && cfg.tiedEmbeddings)) continue;
        const t = await f.readFloat32(name);
        b.set(slot, t.data, t.shape, name, shards.files[i]);
      }
      await f.close();
    }
    const weights = b.finish(where, (s) => `"${hfTensorName(s)}" (not in ${shards.files.join(', ')})`);
    return { weights, format: 'hf', ...(tokenizer ? { tokenizer } : {}) };
  } catch (e) {
    b.dispose();
    throw e;
  }
}

async function llama2cFromBytes(model: Uint8Array, name: string, tok: Uint8Array | undefined, tokName: string): Promise<LoadedModel> {
  const weights = parseLlama2cCheckpoint(model, name);
  if (!tok) return { weights, format: 'llama2c' };
  try {
    const tokenizer = await loadTokenizerFromBytes(tok, { name: tokName, vocabSize: weights.config.vocabSize });
    return { weights, tokenizer, format: 'llama2c' };
  } catch (e) {
    disposeLlamaWeights(weights);
    throw e;
  }
}

/**
 * Loads a model from bytes: the browser's (and any runtime's) form of `loadModel`. The format is told
 * by the files' names and first bytes (see {@link ModelFiles}). Select the tfjs backend first; the
 * caller owns the weights' tensors.
 * @throws KvpackError('unsupported') when no format matches (naming the files); the format loader's
 *   errors ('corrupt', 'truncated', 'shape', 'config', 'io') naming the file otherwise.
 */
export async function loadModelFromBytes(files: ModelFiles | ByteSource, options: ModelBytesOptions = {}): Promise<LoadedModel> {
  const map: ModelFiles =
    files instanceof ArrayBuffer || ArrayBuffer.isView(files) || isBlob(files) || isResponse(files) || isStream(files)
      ? { [isBlob(files) && 'name' in files ? String((files as File).name) : 'model']: files as ByteSource }
      : (files as ModelFiles);
  const read = (n: string) => () =>
    readByteSource(map[n], { name: n, ...(options.onProgress ? { onProgress: (l, t) => options.onProgress!(n, l, t) } : {}) });
  const names = Object.keys(map);
  check(names.length > 0, 'io', 'loadModelFromBytes: no files given');
  if (names.includes('config.json')) return loadHfFromFiles(new Map(names.map((n) => [n, read(n)])), 'the model files', options);
  const first = new Map<string, Uint8Array>();
  for (const n of names) first.set(n, await read(n)());
  const kinds = new Map([...first].map(([n, b]) => [n, sniffModelBytes(b, n)]));
  const gguf = names.find((n) => kinds.get(n) === 'gguf');
  if (gguf) {
    const m = await loadGgufModelFromBytes(first.get(gguf)!, gguf);
    return { weights: m.weights, format: 'gguf', ...(m.tokenizer ? { tokenizer: m.tokenizer } : {}) };
  }
  const isTok = (n: string) => /^(tokenizer|tok\d+)\.bin$/i.test(n.split('/').pop()!);
  const ckpt = names.find((n) => kinds.get(n) === 'llama2c' && !isTok(n));
  if (ckpt) {
    const tok = names.find((n) => n !== ckpt && (isTok(n) || kinds.get(n) === 'json'));
    return llama2cFromBytes(first.get(ckpt)!, ckpt, tok ? first.get(tok) : undefined, tok ?? '');
  }
  if (names.some((n) => kinds.get(n) === 'safetensors'))
    throw new KvpackError('config', `${names.join(', ')}: safetensors weights need their config.json (and tokenizer.json) beside them`);
  throw new KvpackError(
    'unsupported',
    `${names.join(', ')}: unknown model format (expected a .gguf file, a llama2.c .bin checkpoint, or config.json with .safetensors weights)`,
  );
}

/** Options of {@link loadModelFromUrl}. */
export interface ModelUrlOptions extends ModelBytesOptions {
  /** For a llama2.c checkpoint: the URL of its tokenizer (.bin). */
  tokenizer?: string;
  /** The fetch to use (default: the global fetch). */
  fetch?: typeof fetch;
}

/**
 * Loads a model by URL: a `.gguf` file, a llama2.c `.bin` checkpoint (its tokenizer from
 * `options.tokenizer`, else `tokenizer.bin` or `tok{vocab}.bin` beside it when the server has one), or a
 * Hugging Face model folder (a URL ending in `/`, or naming one of its files):
 * config.json, tokenizer.json and tokenizer_config.json when present, then model.safetensors or the
 * shards named by model.safetensors.index.json, fetched one after another as they are loaded.
 * @throws KvpackError('io') for a failed request (naming the URL and HTTP status); loader errors otherwise.
 */
export async function loadModelFromUrl(url: string, options: ModelUrlOptions = {}): Promise<LoadedModel> {
  const f = options.fetch ?? globalThis.fetch;
  const get = async (u: string, name: string, optional = false): Promise<Uint8Array | undefined> => {
    let r: Response;
    try {
      r = await f(u);
    } catch (e) {
      throw new KvpackError('io', `cannot fetch ${u}: ${(e as Error).message}`, { cause: e });
    }
    if (optional && r.status === 404) return undefined;
    return readByteSource(r, { name: u, ...(options.onProgress ? { onProgress: (l, t) => options.onProgress!(name, l, t) } : {}) });
  };
  const path = url.split(/[?#]/)[0];
  const base = path.replace(/[^/]*$/, '');
  const file = path.split('/').pop() ?? '';
  if (/\.gguf$/i.test(path)) return loadModelFromBytes({ [file]: (await get(url, file))! }, options);
  if (/\.bin$/i.test(path)) {
    // A llama2.c checkpoint: its tokenizer from options.tokenizer, else tokenizer.bin or tok{vocab}.bin beside it.
    const bytes = (await get(url, file))!;
    let tok: Uint8Array | undefined;
    if (options.tokenizer) tok = await get(options.tokenizer, options.tokenizer.split(/[?#]/)[0].split('/').pop() || 'tokenizer.bin');
    else {
      tok = await get(`${base}tokenizer.bin`, 'tokenizer.bin', true);
      if (!tok) tok = await get(`${base}tok${Math.abs(readLlama2cHeader(bytes, file).vocabSize)}.bin`, 'tokenizer', true);
    }
    return loadModelFromBytes({ [file]: bytes, ...(tok ? { 'tokenizer.bin': tok } : {}) }, options);
  }
  check(
    path.endsWith('/') || /^(config\.json|tokenizer\.json|model\.safetensors\.index\.json)$/.test(file) || /\.safetensors$/i.test(file),
    'unsupported',
    `${url}: expected a .gguf or llama2.c .bin file, or a Hugging Face model folder (ending in "/", or one of its files)`,
  );
  const names = ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'model.safetensors.index.json'];
  const have = new Map<string, () => Promise<Uint8Array>>();
  const fetched = new Map<string, Uint8Array | undefined>();
  for (const n of names) fetched.set(n, await get(base + n, n, n !== 'config.json'));
  for (const [n, b] of fetched) if (b) have.set(n, async () => b);
  const index = fetched.get('model.safetensors.index.json');
  const shardNames = index
    ? [...new Set(Object.values((parseJson(index, 'model.safetensors.index.json').weight_map ?? {}) as Record<string, string>))]
    : ['model.safetensors'];
  for (const n of shardNames) if (typeof n === 'string' && !/[\\/]/.test(n)) have.set(n, async () => (await get(base + n, n))!);
  return loadHfFromFiles(have, base, options);
}

