/**
 * End to end with the library: load a model, prefill a prompt, compress its KV cache with a strategy
 * read from YAML, decode through the compressed cache, save the cache to a file, load it back and
 * continue decoding from where the saved cache left off.
 *
 *   pnpm --filter @kvpack/examples exec tsx session/main.ts [--json] [--out cache.kvpk]
 *
 * Runs on the repository's embedded model (models/stories260K); KVPACK_MODELS_DIR points elsewhere.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { compressionRatio, createStrategy, describeBackend, disposeKVCache, selectBackend } from '@kvpack/core';
import { registerXkv } from '@kvpack/xkv';
import { registerBaselines } from '@kvpack/baselines';
import { LlamaModel, Session, loadModel } from '@kvpack/models';

const here = import.meta.dirname;
const modelsDir = process.env.KVPACK_MODELS_DIR || resolve(here, '../../models');
const json = process.argv.includes('--json');
const outAt = process.argv.indexOf('--out');
const cacheFile = outAt > 0 ? resolve(process.argv[outAt + 1]) : join(here, 'cache.kvpk');
const log = (s: string) => void (json ? process.stderr : process.stdout).write(`${s}\n`);

// 1. A backend (wasm: the CPU default; `auto` picks a GPU when there is one), and the strategies.
const choice = await selectBackend(process.env.KVPACK_BACKEND || 'wasm');
log(describeBackend(choice));
registerXkv(); // importing @kvpack/xkv registers it too; the call keeps bundlers from dropping that
registerBaselines();

// 2. The model and its tokenizer (llama2.c checkpoint + tok512.bin).
const loaded = await loadModel(join(modelsDir, 'stories260K/stories260K_q80.bin'), { tokenizer: join(modelsDir, 'stories260K/tok512.bin') });
const model = new LlamaModel(loaded.weights);
const tokenizer = loaded.tokenizer!;

// 3. Prefill: the prompt's logits (last row only) and its uncompressed KV cache (pre-RoPE keys).
const prompt =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. ' +
  'One sunny day, Lily and Max went to the park to play with a big red ball.';
const ids = tokenizer.encode(prompt, { bos: true });
const { logits, cache } = await model.prefill(ids, { logits: 'last' });
const lastRow = (await logits.data()) as Float32Array;
logits.dispose();

// 4. Compress with the strategy from YAML; the uncompressed cache is no longer needed.
const strategy = createStrategy(join(here, 'strategy.yaml'));
const compressed = await strategy.compress(cache);
disposeKVCache(cache);
const ratio = compressionRatio(model.layout, ids.length, compressed.byteSize());
log(`prompt: ${ids.length} tokens; ${strategy.name} cache: ${compressed.byteSize()} bytes, ${ratio.toFixed(2)}× smaller than fp16`);

// 5. Decode 16 greedy tokens through the compressed cache (it grows by one token per step). The
//    session's last pick is not in the cache yet: it is fed first by whatever comes next.
const session = new Session(model, compressed, ids.length, lastRow);
const first = await session.greedy(16);
log(`decoded: ${JSON.stringify(tokenizer.decode(first.ids))}`);

// 6. Save the cache (a self-describing container: strategy, options, model fingerprint, CRC) and the
//    token still to feed.
const bytes = session.cache.serialize();
const pending = [...session.pendingTokens];
writeFileSync(cacheFile, bytes);
log(`saved ${bytes.length} bytes to ${cacheFile} at position ${session.position} (${pending.length} token to feed on resume)`);

// 7. Continue in memory, for comparison …
const inMemory = await session.greedy(16);
session.dispose();
compressed.dispose();

// 8. … and from the file: restored for this model only (a cache from another model is refused); the
//    pending token is appended exactly before decoding goes on.
const resumed = await Session.resume(model, readFileSync(cacheFile), { remainingTokens: pending });
const fromFile = await resumed.greedy(16);
resumed.dispose();
log(`continued from the file: ${JSON.stringify(tokenizer.decode(fromFile.ids))}`);

const same = fromFile.ids.every((t, i) => t === inMemory.ids[i]);
log(same ? 'the restored cache continues exactly as the in-memory one' : 'MISMATCH between the restored and the in-memory cache');
model.dispose();
if (json)
  process.stdout.write(`${JSON.stringify({ backend: choice.name, promptTokens: ids.length, ratio, first: first.ids, inMemory: inMemory.ids, fromFile: fromFile.ids, tensors: tf.memory().numTensors })}\n`);
if (!same) process.exitCode = 1;
