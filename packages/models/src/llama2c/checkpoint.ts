import { readFile } from 'node:fs/promises';
import { KvpackError, check } from '@kvpack/core';
import * as tf from '@tensorflow/tfjs-core';
import type { LlamaConfig, LlamaLayerWeights, LlamaWeights } from '../types.js';
import { transposeHost } from '../hf/weights.js';
import { blameField, fmtBytes } from '../bounds.js';

/** The uint32 magic of llama2.c version-1/2 checkpoints: "ak42" read little-endian. */
export const LLAMA2C_MAGIC = 0x616b3432;

/** Bytes of the padded header of version-1/2 checkpoints. */
export const LLAMA2C_HEADER_BYTES = 256;

/** Bytes of the version-0 header (7 int32). */
export const LLAMA2C_V0_HEADER_BYTES = 28;

/**
 * The header of a llama2.c checkpoint (karpathy/llama2.c `export.py`):
 * - version 0 (`legacy_export`, read by run.c): 7 int32, a negative vocab_size meaning an unshared classifier;
 * - version 1 (`version1_export`): magic "ak42", int32 version, 7 int32, uint8 shared_classifier, padded to 256 bytes;
 * - version 2 (`version2_export`, read by runq.c): as version 1 plus an int32 group_size after the flag (Q8_0).
 */
export interface Llama2cHeader {
  version: 0 | 1 | 2;
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  vocabSize: number;
  maxSeqLen: number;
  /** Classifier shares the token embedding (no classifier table in the file). */
  sharedClassifier: boolean;
  /** Q8_0 group size (version 2 only): consecutive values sharing one float32 scale. */
  groupSize?: number;
  /** Bytes before the first weight. */
  headerBytes: number;
}

/** Element counts of the weight tables of one checkpoint, in PyTorch [out, in] orientation. */
function shapes(h: Llama2cHeader) {
  const hd = h.dim / h.nHeads;
  const q = h.nHeads * hd;
  const kv = h.nKvHeads * hd;
  return {
    headDim: hd,
    embedding: [h.vocabSize, h.dim],
    wq: [q, h.dim],
    wk: [kv, h.dim],
    wv: [kv, h.dim],
    wo: [h.dim, q],
    w1: [h.hiddenDim, h.dim],
    w2: [h.dim, h.hiddenDim],
    w3: [h.hiddenDim, h.dim],
  } as const;
}

const MATRICES = ['wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3'] as const;

const numel = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

/**
 * Bytes a checkpoint with this header must have: header, float32 (v0/v1) or Q8_0 (v2) tables, and for
 * version 0 the two RoPE tables [max_seq_len, head_dim/2] that run.c skips. Pure arithmetic (nothing
 * is allocated), so it is safe on hostile headers; for huge fields the result is a huge (possibly
 * inexact, never smaller than the file) float.
 */
export function llama2cExpectedBytes(h: Llama2cHeader): number {
  const s = shapes(h);
  const L = h.nLayers;
  const norms = 2 * L * h.dim + h.dim;
  const perLayer = MATRICES.reduce((a, m) => a + numel(s[m]), 0);
  const mats = numel(s.embedding) * (h.sharedClassifier ? 1 : 2) + L * perLayer;
  if (h.version === 2) return h.headerBytes + 4 * norms + mats + (4 * mats) / h.groupSize!;
  const ropeTables = h.version === 0 ? 2 * h.maxSeqLen * (s.headDim / 2) : 0;
  return h.headerBytes + 4 * (norms + ropeTables + mats);
}

/**
 * The header field most responsible for an implied size larger than the file (see
 * {@link llama2cExpectedBytes} and {@link blameField}).
 */
function largestField(h: Llama2cHeader, found: number): { name: string; value: number; fits?: number } {
  const size = (patch: Partial<Llama2cHeader>) => llama2cExpectedBytes({ ...h, ...patch });
  return blameField(found, [
    { name: 'n_layers', value: h.nLayers, min: 1, bytesWith: (v) => size({ nLayers: v }) },
    { name: 'vocab_size', value: h.vocabSize, min: 1, bytesWith: (v) => size({ vocabSize: v }) },
    { name: 'hidden_dim', value: h.hiddenDim, min: 1, bytesWith: (v) => size({ hiddenDim: v }) },
    { name: 'dim', value: h.dim, min: h.nHeads, bytesWith: (v) => size({ dim: v }) },
    { name: 'max_seq_len', value: h.maxSeqLen, min: 1, bytesWith: (v) => size({ maxSeqLen: v }) },
  ]);
}

/** Why a header is inconsistent, or null when it is fine. */
function headerProblem(h: Llama2cHeader): string | null {
  const ints: [string, number][] = [
    ['dim', h.dim],
    ['hidden_dim', h.hiddenDim],
    ['n_layers', h.nLayers],
    ['n_heads', h.nHeads],
    ['n_kv_heads', h.nKvHeads],
    ['vocab_size', h.vocabSize],
    ['max_seq_len', h.maxSeqLen],
  ];
  for (const [k, v] of ints) if (!(Number.isInteger(v) && v > 0)) return `${k} = ${v} must be a positive integer`;
  if (h.dim % h.nHeads !== 0) return `dim = ${h.dim} is not a multiple of n_heads = ${h.nHeads}`;
  if (h.nHeads % h.nKvHeads !== 0) return `n_heads = ${h.nHeads} is not a multiple of n_kv_heads = ${h.nKvHeads} (GQA)`;
  if ((h.dim / h.nHeads) % 2 !== 0) return `head_dim = dim / n_heads = ${h.dim / h.nHeads} must be even for RoPE`;
  if (h.version === 2) {
    const gs = h.groupSize!;
    if (!(Number.isInteger(gs) && gs > 0)) return `group_size = ${gs} must be a positive integer`;
    const s = shapes(h);
    for (const m of ['embedding', ...MATRICES] as const)
      if (numel(s[m]) % gs !== 0) return `${m} has ${numel(s[m])} values, not a multiple of group_size = ${gs}`;
  }
  return null;
}

/**
 * Reads and checks the header of a llama2.c checkpoint.
 * @param bytes the whole file (or at least its first 256 bytes)
 * @param file the file name, for messages
 * @throws KvpackError('truncated') when the file is shorter than its header;
 *   KvpackError('corrupt') for an unknown version, a missing magic with an invalid version-0 header,
 *   or header values that are non-positive or inconsistent (dim % n_heads, n_heads % n_kv_heads, group_size).
 */
export function readLlama2cHeader(bytes: Uint8Array, file = '<buffer>'): Llama2cHeader {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const i32 = (o: number) => dv.getInt32(o, true);
  if (bytes.byteLength >= 8 && dv.getUint32(0, true) === LLAMA2C_MAGIC) {
    const version = i32(4);
    check(
      version === 1 || version === 2,
      'corrupt',
      `${file}: llama2.c checkpoint version ${version} is not supported (known: 0 without magic, 1 = float32 "ak42", 2 = Q8_0 "ak42")`,
    );
    check(
      bytes.byteLength >= LLAMA2C_HEADER_BYTES,
      'truncated',
      `${file}: truncated llama2.c version-${version} header: expected ${LLAMA2C_HEADER_BYTES} bytes, found ${bytes.byteLength}`,
    );
    const h: Llama2cHeader = {
      version,
      dim: i32(8),
      hiddenDim: i32(12),
      nLayers: i32(16),
      nHeads: i32(20),
      nKvHeads: i32(24),
      vocabSize: i32(28),
      maxSeqLen: i32(32),
      sharedClassifier: bytes[36] !== 0,
      ...(version === 2 ? { groupSize: i32(37) } : {}),
      headerBytes: LLAMA2C_HEADER_BYTES,
    };
    const problem = headerProblem(h);
    if (problem) throw new KvpackError('corrupt', `${file}: invalid llama2.c version-${version} header: ${problem}`);
    return h;
  }
  check(
    bytes.byteLength >= LLAMA2C_V0_HEADER_BYTES,
    'truncated',
    `${file}: too short for a llama2.c checkpoint: ${bytes.byteLength} bytes (a version-0 header alone is ${LLAMA2C_V0_HEADER_BYTES})`,
  );
  const vocab = i32(20);
  const h: Llama2cHeader = {
    version: 0,
    dim: i32(0),
    hiddenDim: i32(4),
    nLayers: i32(8),
    nHeads: i32(12),
    nKvHeads: i32(16),
    vocabSize: Math.abs(vocab),
    maxSeqLen: i32(24),
    sharedClassifier: vocab > 0,
    headerBytes: LLAMA2C_V0_HEADER_BYTES,
  };
  const problem = headerProblem(h);
  if (problem)
    throw new KvpackError(
      'corrupt',
      `${file}: not a llama2.c checkpoint: it does not start with the "ak42" magic of versions 1-2, and read as a version-0 header it is invalid: ${problem}`,
    );
  return h;
}

/**
 * The {@link LlamaConfig} of a llama2.c model: RMSNorm eps 1e-5, RoPE theta 10000 rotating adjacent
 * pairs ('interleaved', as run.c), head_dim = dim / n_heads, BOS 1, EOS 2, no q/k/v biases.
 */
export function llama2cConfig(h: Llama2cHeader): LlamaConfig {
  return {
    nLayers: h.nLayers,
    nHeads: h.nHeads,
    nKvHeads: h.nKvHeads,
    headDim: h.dim / h.nHeads,
    dim: h.dim,
    hiddenDim: h.hiddenDim,
    vocabSize: h.vocabSize,
    maxSeqLen: h.maxSeqLen,
    normEps: 1e-5,
    rope: { theta: 10000, layout: 'interleaved', scaling: null },
    tiedEmbeddings: h.sharedClassifier,
    qkvBias: false,
    bosId: 1,
    eosId: 2,
  };
}

const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** Sequential reader of the weight tables. */
class TableReader {
  private readonly dv: DataView;
  constructor(
    private readonly bytes: Uint8Array,
    public pos: number,
  ) {
    this.dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  /** n float32 values, copied. */
  f32(n: number): Float32Array {
    const at = this.bytes.byteOffset + this.pos;
    let out: Float32Array;
    if (LITTLE_ENDIAN && at % 4 === 0) out = new Float32Array(this.bytes.buffer.slice(at, at + 4 * n));
    else {
      out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = this.dv.getFloat32(this.pos + 4 * i, true);
    }
    this.pos += 4 * n;
    return out;
  }

  /** One Q8_0 table of n values: int8 values then float32 scales, one per group of `gs`. Dequantized. */
  q80(n: number, gs: number): Float32Array {
    const q = new Int8Array(this.bytes.buffer, this.bytes.byteOffset + this.pos, n);
    this.pos += n;
    const scales = this.f32(n / gs);
    const out = new Float32Array(n);
    for (let g = 0, i = 0; g < scales.length; g++) {
      const s = scales[g];
      for (let j = 0; j < gs; j++, i++) out[i] = q[i] * s;
    }
    return out;
  }

  skip(nBytes: number): void {
    this.pos += nBytes;
  }
}

/**
 * Parses a llama2.c checkpoint (version 0, 1 or 2) into {@link LlamaWeights} on the current tfjs
 * backend. Matrices are transposed to [in, out] on the host, one at a time; Q8_0 tables (version 2)
 * are dequantized to float32 (value = int8 × scale of its group). A shared classifier becomes the
 * embedding transposed once ([D, V]). Version 0's two RoPE tables are skipped (kvpack computes RoPE).
 *
 * Layouts: karpathy/llama2.c `export.py` (`legacy_export`, `version1_export`, `version2_export`);
 * readers `run.c` / `runq.c`.
 * @param bytes the whole file
 * @param file the file name, for messages
 * @throws KvpackError('truncated') when the file is shorter than its header implies, checked before anything
 *   is allocated; the message names the header field most responsible (e.g. `header n_layers = 1073741829
 *   needs at least … bytes but the file has …`) and gives expected vs found bytes;
 *   KvpackError('corrupt') for a bad magic/version, an inconsistent header, or trailing bytes.
 */
export function parseLlama2cCheckpoint(bytes: Uint8Array, file = '<buffer>'): LlamaWeights {
  const h = readLlama2cHeader(bytes, file);
  const expected = llama2cExpectedBytes(h);
  const found = bytes.byteLength;
  const what = `llama2.c version-${h.version} checkpoint (dim ${h.dim}, hidden_dim ${h.hiddenDim}, ${h.nLayers} layers, ${h.nHeads} heads, ${h.nKvHeads} KV heads, vocab ${h.vocabSize}, max_seq_len ${h.maxSeqLen}${h.version === 2 ? `, group_size ${h.groupSize}` : ''}, ${h.sharedClassifier ? 'shared' : 'unshared'} classifier)`;
  if (found < expected) {
    const f = largestField(h, found);
    throw new KvpackError(
      'truncated',
      `${file}: header ${f.name} = ${f.value} needs at least ${fmtBytes(expected)} but the file has ${fmtBytes(found)}${f.fits !== undefined ? ` (${f.name} = ${f.fits}, one bit away, would fit it exactly)` : ''}: truncated or corrupt ${what}: expected ${expected} bytes, found ${found}`,
    );
  }
  check(found === expected, 'corrupt', `${file}: ${what} should be ${expected} bytes but the file has ${found} (${found - expected} unexpected trailing bytes)`);

  const config = llama2cConfig(h);
  const s = shapes(h);
  const L = h.nLayers;
  const D = h.dim;
  const r = new TableReader(bytes, h.headerBytes);
  const owned: tf.Tensor[] = [];
  const keep = <T extends tf.Tensor>(t: T): T => (owned.push(t), t);
  const vector = () => keep(tf.tensor1d(r.f32(D)));
  const table = (n: number) => (h.version === 2 ? r.q80(n, h.groupSize!) : r.f32(n));
  /** A [out, in] table read from the file, uploaded as [in, out]. */
  const matrix = ([out, inp]: readonly number[]) => keep(tf.tensor2d(transposeHost(table(out * inp), out, inp), [inp, out]));
  const perLayer = <T>(read: () => T): T[] => Array.from({ length: L }, read);
  try {
    let embData: Float32Array;
    let attnNorm: tf.Tensor1D[];
    let ffnNorm: tf.Tensor1D[];
    let finalNorm: tf.Tensor1D;
    const m: Record<(typeof MATRICES)[number], tf.Tensor2D[]> = { wq: [], wk: [], wv: [], wo: [], w1: [], w2: [], w3: [] };
    if (h.version === 0) {
      embData = r.f32(h.vocabSize * D);
      attnNorm = perLayer(vector);
      for (const k of ['wq', 'wk', 'wv', 'wo'] as const) m[k] = perLayer(() => matrix(s[k]));
      ffnNorm = perLayer(vector);
      for (const k of ['w1', 'w2', 'w3'] as const) m[k] = perLayer(() => matrix(s[k]));
      finalNorm = vector();
      r.skip(2 * 4 * h.maxSeqLen * (s.headDim / 2)); // freq_cis_real, freq_cis_imag: kvpack computes RoPE
    } else {
      attnNorm = perLayer(vector);
      ffnNorm = perLayer(vector);
      finalNorm = vector();
      embData = table(h.vocabSize * D);
      for (const k of MATRICES) m[k] = perLayer(() => matrix(s[k]));
    }
    const embedding = keep(tf.tensor2d(embData, [h.vocabSize, D]));
    const classifier = h.sharedClassifier
      ? keep(tf.tensor2d(transposeHost(embData, h.vocabSize, D), [D, h.vocabSize]))
      : matrix(s.embedding);
    check(r.pos === expected, 'corrupt', `${file}: internal layout error: read ${r.pos} of ${expected} bytes`);
    const layers: LlamaLayerWeights[] = Array.from({ length: L }, (_, l) => ({
      attnNorm: attnNorm[l],
      wq: m.wq[l],
      wk: m.wk[l],
      wv: m.wv[l],
      wo: m.wo[l],
      ffnNorm: ffnNorm[l],
      w1: m.w1[l],
      w2: m.w2[l],
      w3: m.w3[l],
    }));
    return { config, embedding, layers, finalNorm, classifier };
  } catch (e) {
    tf.dispose(owned);
    throw e;
  }
}

/**
 * Reads a llama2.c checkpoint file (version 0, 1 or 2) into {@link LlamaWeights}; see
 * {@link parseLlama2cCheckpoint}. Select the tfjs backend first (`selectBackend`).
 * @throws KvpackError('io') when the file cannot be read; 'truncated' | 'corrupt' as parseLlama2cCheckpoint.
 */
export async function loadLlama2cCheckpoint(path: string): Promise<LlamaWeights> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new KvpackError('io', `cannot read llama2.c checkpoint ${path}: ${(e as Error).message}`, { cause: e });
  }
  return parseLlama2cCheckpoint(bytes, path);
}
