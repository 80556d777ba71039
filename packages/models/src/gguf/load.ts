import { open, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import { KvpackError, check, ropeInverseFrequencies, type RopeConfig, type RopeScaling } from '@kvpack/core';
import type { LlamaConfig, LlamaWeights, Tokenizer } from '../types.js';
import { HF_CONFIG_LIMITS as LIM } from '../hf/config.js';
import { LlamaWeightsBuilder, checkpointShape, type LayerField, type WeightSlot } from '../hf/weights.js';
import { dequantizeGgml, ggmlTensorBytes } from './quant.js';
import { checkGgufTensorData, parseGgufHeader } from './header.js';
import { SpmTokenizer, gpt2Tokenizer } from './tokenizer.js';

type Metadata = Record<string, unknown>;

/** One tensor of a GGUF file: ne (fastest dim first), ggml type, absolute byte range. */
export interface GgufTensor {
  name: string;
  /** GGUF dims, ne[0] first (the fastest-varying): a PyTorch [out, in] matrix has ne = [in, out]. */
  ne: number[];
  type: number;
  /** Absolute byte offset in the file. */
  start: number;
  /** Bytes of data (ggml type × ne), checked to lie inside the file; −1 for types kvpack cannot read. */
  byteLength: number;
}

/** A parsed GGUF header. */
export interface GgufFile {
  file: string;
  fileSize: number;
  version: number;
  metadata: Metadata;
  tensors: Map<string, GgufTensor>;
  /** The whole file, when it was read from bytes ({@link readGgufHeaderFromBytes}) rather than a path. */
  bytes?: Uint8Array;
}

/**
 * Parses a GGUF file's header (metadata and tensor infos, {@link parseGgufHeader}) and checks it
 * against the file's size before anything is sized by it: counts of tensors, KV pairs and array
 * elements and string lengths fit in the bytes left; every tensor's offset is aligned, its data
 * (for the types kvpack reads) ends inside the file, and no two tensors overlap.
 * @throws KvpackError('io') when the file cannot be read; ('truncated') when the header or a
 *         tensor's data ends past the end of the file, or a count or length claims more bytes than
 *         the file has (naming the field); ('corrupt') for a bad magic/version, duplicate keys or
 *         tensors, overlapping or misaligned tensor data; ('unsupported') for big-endian files.
 */
export async function readGgufHeader(file: string): Promise<GgufFile> {
  const name = basename(file);
  let fh: FileHandle;
  try {
    fh = await open(file, 'r');
  } catch (e) {
    throw new KvpackError('io', `cannot open ${file}: ${(e as Error).message}`, { cause: e });
  }
  try {
    const fileSize = (await fh.stat()).size;
    check(fileSize >= 24, 'truncated', `${name} is truncated: ${fileSize} bytes, shorter than a GGUF header`);
    const parsed = await parseGgufHeader(
      async (position, length) => {
        const buf = new Uint8Array(length);
        let done = 0;
        while (done < length) {
          const { bytesRead } = await fh.read(buf, done, length - done, position + done);
          if (bytesRead === 0) break;
          done += bytesRead;
        }
        return buf.subarray(0, done);
      },
      fileSize,
      name,
    );
    const spans = checkGgufTensorData(parsed, fileSize, name);
    const tensors = new Map<string, GgufTensor>();
    parsed.tensorInfos.forEach((t, i) => tensors.set(t.name, { name: t.name, ne: t.ne, type: t.type, ...spans[i] }));
    return { file, fileSize, version: parsed.version, metadata: parsed.metadata, tensors };
  } finally {
    await fh.close();
  }
}

/**
 * Parses the header of a GGUF file held in memory (a file dropped on a page, a fetched model), with
 * the checks of {@link readGgufHeader}; its tensors are then read from these bytes.
 * @param file the file name, for messages
 * @throws KvpackError('truncated' | 'corrupt' | 'unsupported') as {@link readGgufHeader}.
 */
export async function readGgufHeaderFromBytes(bytes: Uint8Array, file = 'model.gguf'): Promise<GgufFile> {
  const name = basename(file);
  check(bytes.length >= 24, 'truncated', `${name} is truncated: ${bytes.length} bytes, shorter than a GGUF header`);
  const parsed = await parseGgufHeader(async (position, length) => bytes.subarray(position, position + length), bytes.length, name);
  const spans = checkGgufTensorData(parsed, bytes.length, name);
  const tensors = new Map<string, GgufTensor>();
  parsed.tensorInfos.forEach((t, i) => tensors.set(t.name, { name: t.name, ne: t.ne, type: t.type, ...spans[i] }));
  return { file, fileSize: bytes.length, version: parsed.version, metadata: parsed.metadata, tensors, bytes };
}

/**
 * Reads and dequantizes one tensor to float32, in row-major order of its reversed ne (PyTorch
 * orientation: a matrix comes back [out, in]).
 * @throws KvpackError('unsupported') naming the tensor and its ggml type.
 */
export async function readGgufTensor(g: GgufFile, name: string): Promise<{ shape: number[]; data: Float32Array }> {
  const t = g.tensors.get(name);
  check(t, 'corrupt', `${basename(g.file)}: missing tensor "${name}"`);
  const count = t.ne.reduce((a, b) => a * b, 1);
  const bytes = new Uint8Array(ggmlTensorBytes(t.type, count, t.ne[0], name, basename(g.file)));
  if (g.bytes) {
    check(t.start + bytes.length <= g.bytes.length, 'truncated', `${basename(g.file)} is truncated inside tensor "${name}"`);
    bytes.set(g.bytes.subarray(t.start, t.start + bytes.length));
    return { shape: [...t.ne].reverse(), data: dequantizeGgml(t.type, bytes, count) };
  }
  const fh = await open(g.file, 'r');
  try {
    const { bytesRead } = await fh.read(bytes, 0, bytes.length, t.start);
    check(bytesRead === bytes.length, 'truncated', `${basename(g.file)} is truncated inside tensor "${name}"`);
  } finally {
    await fh.close();
  }
  return { shape: [...t.ne].reverse(), data: dequantizeGgml(t.type, bytes, count) };
}

const LAYER_NAMES: Record<LayerField, string> = {
  attnNorm: 'attn_norm.weight',
  wq: 'attn_q.weight',
  wk: 'attn_k.weight',
  wv: 'attn_v.weight',
  wo: 'attn_output.weight',
  bq: 'attn_q.bias',
  bk: 'attn_k.bias',
  bv: 'attn_v.bias',
  qNorm: 'attn_q_norm.weight',
  kNorm: 'attn_k_norm.weight',
  ffnNorm: 'ffn_norm.weight',
  w1: 'ffn_gate.weight',
  w2: 'ffn_down.weight',
  w3: 'ffn_up.weight',
};

/** The llama.cpp tensor name of a weight slot (`blk.3.attn_q.weight`, `token_embd.weight`, …). */
export function ggufTensorName(s: WeightSlot): string {
  if (s === 'embedding') return 'token_embd.weight';
  if (s === 'finalNorm') return 'output_norm.weight';
  if (s === 'classifier') return 'output.weight';
  return `blk.${s.layer}.${LAYER_NAMES[s.field]}`;
}

/** GGUF architectures kvpack runs, and the RoPE layout llama.cpp uses for each. */
const ARCH_ROPE: Record<string, RopeConfig['layout']> = {
  // LLAMA_ROPE_TYPE_NORM: convert_hf_to_gguf.py permutes q/k rows back to Meta's interleaved pairs.
  llama: 'interleaved',
  // LLAMA_ROPE_TYPE_NEOX: weights kept as in transformers (rotate_half).
  qwen2: 'half',
};

/** Known Llama 3.x `rope_scaling` settings, to recognise a `rope_freqs.weight` table. */
const LLAMA3_CANDIDATES = [
  { lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
  { lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 4096 },
];

/**
 * llama.cpp stores Llama 3.1-style scaling as a per-frequency divisor table `rope_freqs.weight`
 * (d/2 values). kvpack's {@link RopeScaling} is parametric, so the table is matched against the
 * llama3 formula (factor = the table's largest entry) for the usual low/high/original settings.
 */
function llama3FromFreqFactors(table: Float32Array, theta: number, headDim: number, file: string): RopeScaling {
  const factor = Math.max(...table);
  const base = ropeInverseFrequencies({ theta, layout: 'half' }, headDim);
  for (const c of LLAMA3_CANDIDATES) {
    const s: RopeScaling = { type: 'llama3', factor, ...c };
    const inv = ropeInverseFrequencies({ theta, layout: 'half', scaling: s }, headDim);
    if (inv.every((v, i) => Math.abs(base[i] / v - table[i]) <= 1e-3 * table[i])) return s;
  }
  throw new KvpackError('unsupported', `${file}: rope_freqs.weight does not match Llama 3 RoPE scaling for any known setting`);
}

function metaInt(m: Metadata, key: string, file: string, fallback?: number, max = Number.MAX_SAFE_INTEGER): number {
  const raw = m[key] ?? fallback;
  const v = typeof raw === 'bigint' ? Number(raw) : raw;
  check(Number.isInteger(v) && (v as number) > 0, 'config', `${file}: metadata "${key}" must be a positive integer, got ${String(m[key])}`);
  check((v as number) <= max, 'config', `${file}: metadata "${key}" = ${String(m[key])} is above the sane bound ${max} (corrupt or hostile file)`);
  return v as number;
}

/** Layers a GGUF file holds: one more than the largest N of its `blk.N.*` tensors (0 when none). */
export function ggufLayersHeld(g: GgufFile): number {
  let held = 0;
  for (const n of g.tensors.keys()) {
    const m = /^blk\.(\d+)\./.exec(n);
    if (m) held = Math.max(held, Number(m[1]) + 1);
  }
  return held;
}

function metaNum(m: Metadata, key: string, file: string, fallback: number): number {
  const v = m[key] ?? fallback;
  check(typeof v === 'number' && Number.isFinite(v) && v > 0, 'config', `${file}: metadata "${key}" must be a positive number, got ${String(m[key])}`);
  return v;
}

/**
 * Maps GGUF metadata (`{arch}.context_length`, `embedding_length`, `block_count`,
 * `feed_forward_length`, `attention.head_count`, `attention.head_count_kv`, `attention.key_length`,
 * `attention.layer_norm_rms_epsilon`, `rope.freq_base`, `rope.scaling.*`) and tensor shapes to a
 * {@link LlamaConfig}. The RoPE layout is the one llama.cpp runs the architecture with: `llama` →
 * `interleaved` (its q/k weights are stored permuted into Meta's adjacent-pair layout, and kvpack
 * keeps them that way: attention is unchanged by a consistent permutation of q/k channels, so the
 * logits equal the Hugging Face model's, and no rows need rewriting); `qwen2` → `half`.
 * Dimensions are bounded as config.json's ({@link HF_CONFIG_LIMITS}), and `block_count` must equal
 * the number of `blk.N` layers the file's tensors hold.
 * @throws KvpackError('unsupported') for other architectures or RoPE scalings, ('config') for
 *         missing/invalid/out-of-bound metadata or a block_count the tensors disagree with.
 */
export async function ggufConfig(g: GgufFile): Promise<LlamaConfig> {
  const name = basename(g.file);
  const m = g.metadata;
  const arch = m['general.architecture'];
  check(typeof arch === 'string' && arch in ARCH_ROPE, 'unsupported', `${name}: architecture "${String(arch)}" is not supported (kvpack runs ${Object.keys(ARCH_ROPE).join(', ')})`);
  const k = (s: string) => `${arch}.${s}`;
  const dim = metaInt(m, k('embedding_length'), name, undefined, LIM.hidden_size);
  const nHeads = metaInt(m, k('attention.head_count'), name, undefined, LIM.num_attention_heads);
  const nKvHeads = metaInt(m, k('attention.head_count_kv'), name, nHeads, LIM.num_key_value_heads);
  check(nHeads % nKvHeads === 0, 'config', `${name}: head_count ${nHeads} is not a multiple of head_count_kv ${nKvHeads}`);
  const headDim = metaInt(m, k('attention.key_length'), name, dim / nHeads, LIM.head_dim);
  check(headDim % 2 === 0, 'config', `${name}: head_dim ${headDim} must be even`);
  const vHead = metaInt(m, k('attention.value_length'), name, headDim);
  check(vHead === headDim, 'unsupported', `${name}: value_length ${vHead} differs from key_length ${headDim}`);
  const ropeDims = metaInt(m, k('rope.dimension_count'), name, headDim);
  check(ropeDims === headDim, 'unsupported', `${name}: partial RoPE (rope.dimension_count ${ropeDims} < head_dim ${headDim}) is not supported`);
  const emb = g.tensors.get('token_embd.weight');
  check(emb && emb.ne.length === 2, 'corrupt', `${name}: missing tensor "token_embd.weight"`);
  const vocabSize = metaInt(m, k('vocab_size'), name, emb.ne[1], LIM.vocab_size);
  const theta = metaNum(m, k('rope.freq_base'), name, 10000);

  let scaling: RopeScaling | null = null;
  const st = m[k('rope.scaling.type')];
  const sf = m[k('rope.scaling.factor')];
  if (st !== undefined && st !== 'none' && st !== 'linear')
    throw new KvpackError('unsupported', `${name}: rope.scaling.type "${String(st)}" is not supported (kvpack supports linear and Llama 3 rope_freqs)`);
  // Older files give only rope.scaling.factor (then linear); a factor of 1 means none.
  if (st === 'linear' || (st === undefined && sf !== undefined && sf !== 1)) scaling = { type: 'linear', factor: metaNum(m, k('rope.scaling.factor'), name, NaN) };
  if (g.tensors.has('rope_freqs.weight')) {
    const t = await readGgufTensor(g, 'rope_freqs.weight');
    check(t.data.length === headDim / 2, 'shape', `${name}: rope_freqs.weight has ${t.data.length} values, expected head_dim/2 = ${headDim / 2}`);
    scaling = llama3FromFreqFactors(t.data, theta, headDim, name);
  }
  const id = (key: string) => {
    const v = m[key];
    return typeof v === 'number' || typeof v === 'bigint' ? Number(v) : undefined;
  };
  const nLayers = metaInt(m, k('block_count'), name, undefined, LIM.num_hidden_layers);
  const held = ggufLayersHeld(g);
  check(
    nLayers === held,
    'config',
    `${name}: metadata ${k('block_count')} = ${nLayers} but the file holds ${held} layer${held === 1 ? '' : 's'} of tensors${held ? ` (blk.0 … blk.${held - 1})` : ''}`,
  );
  return {
    nLayers,
    nHeads,
    nKvHeads,
    headDim,
    dim,
    hiddenDim: metaInt(m, k('feed_forward_length'), name, undefined, LIM.intermediate_size),
    vocabSize,
    maxSeqLen: metaInt(m, k('context_length'), name, 2048, LIM.max_position_embeddings),
    normEps: metaNum(m, k('attention.layer_norm_rms_epsilon'), name, 1e-5),
    rope: { theta, layout: ARCH_ROPE[arch], scaling },
    tiedEmbeddings: !g.tensors.has('output.weight'),
    qkvBias: g.tensors.has('blk.0.attn_q.bias'),
    bosId: id('tokenizer.ggml.bos_token_id'),
    eosId: id('tokenizer.ggml.eos_token_id'),
  };
}

/**
 * Loads a GGUF model's weights as float32 {@link LlamaWeights} ([in, out] matrices), dequantizing
 * F32/F16/BF16/Q8_0/Q4_0 tensors one at a time. Q/K rows stay in llama.cpp's order (see
 * {@link ggufConfig} for the RoPE layout that goes with it).
 * @throws KvpackError naming the file and tensor: 'unsupported' (ggml type), 'shape' (vs metadata),
 *         'corrupt' (missing tensor), 'truncated'.
 */
export async function loadGgufWeights(g: GgufFile, config?: LlamaConfig): Promise<LlamaWeights> {
  const cfg = config ?? (await ggufConfig(g));
  const name = basename(g.file);
  const b = new LlamaWeightsBuilder(cfg, 'the GGUF metadata');
  try {
    const slots: WeightSlot[] = ['embedding', 'finalNorm'];
    if (!cfg.tiedEmbeddings) slots.push('classifier');
    for (let l = 0; l < cfg.nLayers; l++)
      for (const field of Object.keys(LAYER_NAMES) as LayerField[])
        if ((cfg.qkvBias || !field.startsWith('b')) && (cfg.qkNorm || (field !== 'qNorm' && field !== 'kNorm'))) slots.push({ layer: l, field });
    // Every shape against the metadata before any tensor is read.
    for (const s of slots) {
      const tn = ggufTensorName(s);
      const t = g.tensors.get(tn);
      if (!t) continue; // reported by finish()
      const shape = [...t.ne].reverse();
      const want = checkpointShape(cfg, s);
      check(
        shape.length === want.length && shape.every((v, i) => v === want[i]),
        'shape',
        `${name}: tensor "${tn}" has shape [${shape}] but the GGUF metadata implies [${want}]`,
      );
    }
    for (const s of slots) {
      const tn = ggufTensorName(s);
      if (!g.tensors.has(tn)) continue; // reported by finish()
      const t = await readGgufTensor(g, tn);
      b.set(s, t.data, t.shape, tn, name);
    }
    return b.finish(name, (s) => `"${ggufTensorName(s)}"`);
  } catch (e) {
    b.dispose();
    throw e;
  }
}

/**
 * The tokenizer stored in a GGUF file's metadata: `tokenizer.ggml.model` = `llama`
 * (SentencePiece-style scored BPE with byte fallback, {@link SpmTokenizer}) or `gpt2` (byte-level
 * BPE with merges, {@link gpt2Tokenizer}).
 * @throws KvpackError('unsupported') for other models; ('corrupt') when tokens are missing.
 */
export function ggufTokenizer(g: GgufFile): Tokenizer {
  const name = basename(g.file);
  const m = g.metadata;
  const model = m['tokenizer.ggml.model'];
  const tokens = m['tokenizer.ggml.tokens'];
  check(typeof model === 'string', 'corrupt', `${name}: no tokenizer.ggml.model in the metadata`);
  const id = (key: string) => {
    const v = m[key];
    return typeof v === 'number' || typeof v === 'bigint' ? Number(v) : undefined;
  };
  const types = m['tokenizer.ggml.token_type'] as number[] | undefined;
  if (model === 'llama' || model === 'gpt2') {
    check(Array.isArray(tokens), 'corrupt', `${name}: no tokenizer.ggml.tokens in the metadata`);
    check(tokens.every((t) => typeof t === 'string'), 'corrupt', `${name}: tokenizer.ggml.tokens must be an array of strings`);
    check(
      types === undefined || (Array.isArray(types) && types.length === tokens.length && types.every((t) => Number.isInteger(t))),
      'corrupt',
      `${name}: tokenizer.ggml.token_type must be ${tokens.length} integers, one per token`,
    );
    for (const key of ['bos', 'eos', 'unknown'] as const) {
      const v = id(`tokenizer.ggml.${key}_token_id`);
      check(v === undefined || (Number.isInteger(v) && v >= 0 && v < tokens.length), 'corrupt', `${name}: tokenizer.ggml.${key}_token_id = ${v} is not an id of the ${tokens.length} tokens`);
    }
  }
  if (model === 'llama') {
    const scores = m['tokenizer.ggml.scores'];
    check(
      Array.isArray(scores) && scores.length === (tokens as unknown[]).length && scores.every((x) => typeof x === 'number'),
      'corrupt',
      `${name}: a "llama" tokenizer needs tokenizer.ggml.scores, one number per token`,
    );
    return new SpmTokenizer({
      tokens: tokens as string[],
      scores: scores as number[],
      tokenTypes: types,
      bosId: id('tokenizer.ggml.bos_token_id'),
      eosId: id('tokenizer.ggml.eos_token_id'),
      unkId: id('tokenizer.ggml.unknown_token_id'),
      addSpacePrefix: m['tokenizer.ggml.add_space_prefix'] !== false,
    });
  }
  if (model === 'gpt2') {
    const merges = m['tokenizer.ggml.merges'];
    check(Array.isArray(merges) && merges.every((x) => typeof x === 'string'), 'corrupt', `${name}: a "gpt2" tokenizer needs tokenizer.ggml.merges, an array of strings`);
    return gpt2Tokenizer(
      {
        tokens: tokens as string[],
        merges: merges as string[],
        tokenTypes: types,
        pre: typeof m['tokenizer.ggml.pre'] === 'string' ? (m['tokenizer.ggml.pre'] as string) : undefined,
        bosId: id('tokenizer.ggml.bos_token_id'),
        eosId: id('tokenizer.ggml.eos_token_id'),
      },
      name,
    );
  }
  throw new KvpackError('unsupported', `${name}: tokenizer model "${model}" is not supported (kvpack reads "llama" and "gpt2")`);
}


/** A loaded GGUF model. */
export interface GgufModel {
  config: LlamaConfig;
  weights: LlamaWeights;
  tokenizer?: Tokenizer;
  /** The parsed header (metadata, tensor table). */
  header: GgufFile;
}

/**
 * Loads a `.gguf` file: config from metadata, dequantized float32 weights, and the tokenizer when
 * the metadata has one.
 */
export async function loadGgufModel(file: string): Promise<GgufModel> {
  return ggufModelOf(await readGgufHeader(file));
}

/**
 * Loads a GGUF model held in memory (see {@link readGgufHeaderFromBytes}), as {@link loadGgufModel}.
 * @param file the file name, for messages
 */
export async function loadGgufModelFromBytes(bytes: Uint8Array, file = 'model.gguf'): Promise<GgufModel> {
  return ggufModelOf(await readGgufHeaderFromBytes(bytes, file));
}

async function ggufModelOf(header: GgufFile): Promise<GgufModel> {
  const file = header.file;
  const config = await ggufConfig(header);
  const tokenizer = header.metadata['tokenizer.ggml.model'] !== undefined ? ggufTokenizer(header) : undefined;
  if (tokenizer)
    check(
      tokenizer.vocabSize <= config.vocabSize,
      'config',
      `${basename(file)}: the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocabulary is ${config.vocabSize}`,
    );
  const weights = await loadGgufWeights(header, config);
  return { config, weights, header, ...(tokenizer ? { tokenizer } : {}) };
}
