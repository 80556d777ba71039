import { existsSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { basename, dirname, extname, join } from 'node:path';
import { KvpackError, check } from '@kvpack/core';
import type { LlamaWeights, Tokenizer } from './types.js';
import { HfTokenizer, disposeLlamaWeights, loadHfModel, loadHfTokenizer } from './hf/index.js';
import { ggufTokenizer, loadGgufModel, readGgufHeader } from './gguf/index.js';
import { LLAMA2C_MAGIC, loadLlama2cCheckpoint, loadLlama2cTokenizer } from './llama2c/index.js';

/** Model file formats {@link loadModel} recognises. */
export type ModelFormat = 'llama2c' | 'hf' | 'gguf';

/** A loaded model: weights, its tokenizer when one was found, and the detected format. */
export interface LoadedModel {
  weights: LlamaWeights;
  tokenizer?: Tokenizer;
  format: ModelFormat;
}

/** Options of {@link loadModel}. */
export interface LoadModelOptions {
  /**
   * Tokenizer file for llama2.c checkpoints (which do not embed one). Default: `tokenizer.bin` or
   * `tok{vocab_size}.bin` next to the checkpoint, when present.
   */
  tokenizer?: string;
}

const GGUF_MAGIC = 0x46554747; // "GGUF" read little-endian

async function firstWord(file: string): Promise<number | undefined> {
  const fh = await open(file, 'r').catch((e: Error) => {
    throw new KvpackError('io', `cannot open ${file}: ${e.message}`, { cause: e });
  });
  try {
    const b = new Uint8Array(4);
    const { bytesRead } = await fh.read(b, 0, 4, 0);
    return bytesRead === 4 ? new DataView(b.buffer).getUint32(0, true) : undefined;
  } finally {
    await fh.close();
  }
}

/**
 * Tells a path's model format: a directory with config.json (or its config.json / .safetensors
 * file) is `hf`; a file starting with "GGUF" is `gguf`; a file starting with "ak42" (llama2.c
 * version 1/2) or any other `.bin` (llama2.c version 0, which has no magic) is `llama2c`.
 * @throws KvpackError('io') for a missing path; ('unsupported') when no format matches.
 */
export async function detectModelFormat(path: string): Promise<{ format: ModelFormat; path: string }> {
  check(existsSync(path), 'io', `${path} does not exist`);
  if (statSync(path).isDirectory()) {
    check(existsSync(join(path, 'config.json')), 'unsupported', `${path} is a directory without config.json (expected a Hugging Face model directory)`);
    return { format: 'hf', path };
  }
  const word = await firstWord(path);
  if (word === GGUF_MAGIC) return { format: 'gguf', path };
  if (word === LLAMA2C_MAGIC) return { format: 'llama2c', path };
  const name = basename(path);
  if (name === 'config.json' || name === 'model.safetensors.index.json' || extname(name) === '.safetensors')
    return { format: 'hf', path: dirname(path) };
  if (extname(name) === '.bin') return { format: 'llama2c', path };
  throw new KvpackError(
    'unsupported',
    `${path}: unknown model format (expected a Hugging Face directory, a .gguf file or a llama2.c .bin checkpoint)`,
  );
}

/** The llama2.c tokenizer beside a checkpoint (`tokenizer.bin`, `tok{V}.bin`), if any. */
function siblingLlama2cTokenizer(checkpoint: string, vocabSize?: number): string | undefined {
  const dir = dirname(checkpoint);
  const names = ['tokenizer.bin', ...(vocabSize !== undefined ? [`tok${vocabSize}.bin`] : [])];
  return names.map((n) => join(dir, n)).find((f) => existsSync(f) && f !== checkpoint);
}

/**
 * Loads a model from a llama2.c checkpoint (.bin), a Hugging Face directory (config.json +
 * safetensors + tokenizer.json) or a GGUF file, detected by {@link detectModelFormat}.
 * Select the tfjs backend first (`selectBackend`). The caller owns the weights' tensors.
 * @throws KvpackError from the format's loader, naming the file.
 */
export async function loadModel(path: string, options: LoadModelOptions = {}): Promise<LoadedModel> {
  const d = await detectModelFormat(path);
  if (d.format === 'hf') {
    const m = await loadHfModel(d.path);
    return { weights: m.weights, format: 'hf', ...(m.tokenizer ? { tokenizer: m.tokenizer } : {}) };
  }
  if (d.format === 'gguf') {
    const m = await loadGgufModel(d.path);
    return { weights: m.weights, format: 'gguf', ...(m.tokenizer ? { tokenizer: m.tokenizer } : {}) };
  }
  const weights = await loadLlama2cCheckpoint(d.path);
  const tokFile = options.tokenizer ?? siblingLlama2cTokenizer(d.path, weights.config.vocabSize);
  if (!tokFile) return { weights, format: 'llama2c' };
  try {
    const tokenizer = await loadLlama2cTokenizer(tokFile, weights.config.vocabSize);
    return { weights, tokenizer, format: 'llama2c' };
  } catch (e) {
    disposeLlamaWeights(weights);
    throw e;
  }
}

/** Options of {@link loadTokenizer}. */
export interface LoadTokenizerOptions {
  /** Model vocabulary size: checked against llama2.c tokenizer files, which do not store theirs. */
  vocabSize?: number;
}

/**
 * Loads only a tokenizer: from a Hugging Face directory or tokenizer.json, a GGUF file's metadata,
 * or a llama2.c tokenizer .bin (for a llama2.c checkpoint, the tokenizer beside it).
 * @throws KvpackError('io') when none is found; loader errors otherwise.
 */
export async function loadTokenizer(path: string, options: LoadTokenizerOptions = {}): Promise<Tokenizer> {
  check(existsSync(path), 'io', `${path} does not exist`);
  if (statSync(path).isDirectory()) return loadHfTokenizer(path);
  if (basename(path) === 'tokenizer.json') return HfTokenizer.fromFile(path);
  const word = await firstWord(path);
  if (word === GGUF_MAGIC) return ggufTokenizer(await readGgufHeader(path));
  if (word === LLAMA2C_MAGIC) {
    // A llama2.c checkpoint embeds no tokenizer: use the file next to it.
    const f = siblingLlama2cTokenizer(path, options.vocabSize);
    check(f, 'io', `${path} is a llama2.c checkpoint, which embeds no tokenizer, and no tokenizer.bin (or tok{vocab}.bin) lies beside it`);
    return loadLlama2cTokenizer(f, options.vocabSize);
  }
  const name = basename(path);
  if (name === 'config.json' || extname(name) === '.safetensors') return loadHfTokenizer(dirname(path));
  return loadLlama2cTokenizer(path, options.vocabSize);
}
