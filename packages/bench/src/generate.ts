import { existsSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { dirname, extname, resolve } from 'node:path';
import { KvpackError, check, compressionRatioOf, createStrategy, denseCacheBytes, readConfigFile, selectBackend, type Strategy } from '@kvpack/core';
import { LlamaModel, Session } from '@kvpack/models';
import { z } from 'zod';
import { processIO, type CommandIO } from './commands.js';
import { loadBenchModel } from './load.js';
import { resolveModelPath } from './models-dir.js';
import type { BenchTokenizer } from './model.js';

/** Options of `kvpack generate`. */
export interface GenerateCommandOptions {
  /** Model checkpoint or folder; default stories260K (`$KVPACK_MODELS_DIR`, else the repository's embedded `models/`, else `../shared/models`). */
  model?: string;
  tokenizer?: string;
  /** Prompt text (after a loaded cache: appended to it). */
  prompt?: string;
  /** Chat file (JSON or YAML list of `{ role, content }`), rendered as a plain transcript. */
  chat?: string;
  /** Strategy config file (JSON/YAML `{ name, options }`) or a registered strategy name at its defaults. Default `dense`. */
  strategy?: string;
  saveCache?: string;
  loadCache?: string;
  /** Tokens to generate (default 64). */
  maxTokens?: string | number;
  /** Sampling temperature (default 0: greedy) and seed. */
  temperature?: string | number;
  seed?: string | number;
  backend?: string;
  /** Prepend BOS to a new prompt (default true). */
  bos?: boolean;
}

/** The default model: the stories260K checkpoint the bench configs use. */
export function defaultModelPaths(): { model: string; tokenizer: string } {
  return { model: resolveModelPath('stories260K/stories260K_q80.bin'), tokenizer: resolveModelPath('stories260K/tok512.bin') };
}

// The session file format lives in @kvpack/models (the browser example writes it too).
import { decodeSessionFile, encodeSessionFile, type SessionFileHeader } from '@kvpack/models';
export { decodeSessionFile, encodeSessionFile, type SessionFileHeader };

function int(v: string | number | undefined, name: string, dflt: number, min = 0): number {
  if (v === undefined) return dflt;
  const n = typeof v === 'number' ? v : Number(v);
  if (!Number.isInteger(n) || n < min) throw new KvpackError('config', `${name} must be an integer ≥ ${min}, got "${v}"`);
  return n;
}

/** `--strategy`: a JSON/YAML file, else a registered name at its default options. */
export function strategyArg(arg: string): Strategy {
  const ext = extname(arg).toLowerCase();
  if (existsSync(arg) || ext === '.json' || ext === '.yaml' || ext === '.yml') return createStrategy(arg);
  return createStrategy({ name: arg });
}

const ChatSchema = z.array(z.strictObject({ role: z.string().min(1), content: z.string() })).min(1);

/**
 * A chat file rendered as a plain transcript: one `role: content` line per message, then
 * `assistant:` for the reply (models without a chat template, such as stories260K, read it as text).
 * @throws KvpackError('config' | 'io')
 */
export function renderChat(path: string): string {
  const r = ChatSchema.safeParse(readConfigFile(path));
  if (!r.success) throw new KvpackError('config', `${path}: a chat file is a list of { role, content } messages:\n${z.prettifyError(r.error)}`);
  return `${r.data.map((m) => `${m.role}: ${m.content}`).join('\n')}\nassistant:`;
}

/**
 * Streams decoded text: each call prints what the tokens so far add to the text, decoding them after
 * `context` (the token before them, which decides e.g. a leading space) and holding back an
 * incomplete UTF-8 sequence.
 */
function textStream(tokenizer: BenchTokenizer | undefined, context: number[], write: (s: string) => void) {
  const ids: number[] = [];
  const base = tokenizer ? tokenizer.decode(context).length : 0;
  let printed = base;
  return (tok: number) => {
    ids.push(tok);
    if (!tokenizer) return write(`${ids.length > 1 ? ' ' : ''}${tok}`);
    const text = tokenizer.decode([...context, ...ids]);
    if (text.endsWith('\uFFFD')) return;
    write(text.slice(printed));
    printed = text.length;
  };
}

/**
 * `kvpack generate`: prefill a prompt (or continue a loaded cache), compress it with a strategy,
 * stream the generated text to stdout, and optionally save the session (the compressed cache and its
 * token ids) for a later `--load-cache`. A summary goes to stderr.
 * @returns 0; throws KvpackError on bad input (the CLI exits 2).
 */
export async function generateCommand(opts: GenerateCommandOptions, io: CommandIO = processIO): Promise<number> {
  await import('@kvpack/xkv');
  await import('@kvpack/baselines');
  check(!(opts.prompt !== undefined && opts.chat !== undefined), 'config', 'pass --prompt or --chat, not both');
  check(!(opts.loadCache && opts.strategy), 'config', '--strategy does not apply to --load-cache (the cache records its strategy)');
  const maxTokens = int(opts.maxTokens, '--max-tokens', 64);
  const temperature = opts.temperature === undefined ? 0 : Number(opts.temperature);
  check(Number.isFinite(temperature) && temperature >= 0, 'config', `--temperature must be a number ≥ 0, got "${opts.temperature}"`);
  const seed = int(opts.seed, '--seed', 0);
  if (opts.saveCache) {
    const dir = dirname(resolve(opts.saveCache));
    check(existsSync(dir) && statSync(dir).isDirectory(), 'io', `--save-cache ${opts.saveCache}: the folder ${dir} does not exist`);
  }
  const strategy = opts.strategy ? strategyArg(opts.strategy) : undefined;
  const defaults = defaultModelPaths();
  const modelPath = opts.model ? resolve(opts.model) : defaults.model;
  const tokenizerPath = opts.tokenizer ? resolve(opts.tokenizer) : opts.model ? undefined : defaults.tokenizer;
  for (const p of [modelPath, ...(tokenizerPath ? [tokenizerPath] : [])])
    check(existsSync(p), 'io', `model file not found: ${p} (pass --model FILE, or set KVPACK_MODELS_DIR to the folder holding stories260K/)`);
  const choice = await selectBackend(opts.backend);
  const { model, tokenizer } = await loadBenchModel(modelPath, tokenizerPath);
  const text = opts.chat !== undefined ? renderChat(opts.chat) : opts.prompt;
  const encode = (t: string, bos: boolean) => {
    check(tokenizer, 'config', 'the model has no tokenizer: pass --tokenizer FILE');
    return tokenizer.encode(t, { bos: bos && tokenizer.bosId !== undefined });
  };
  let session: Session | undefined;
  try {
    const lm = model as LlamaModel;
    let promptTokens: number;
    let compressedNote = '';
    if (opts.loadCache) {
      let bytes: Uint8Array;
      try {
        bytes = readFileSync(opts.loadCache);
      } catch (e) {
        throw new KvpackError('io', `cannot read ${opts.loadCache}: ${(e as Error).message}`, { cause: e });
      }
      const { header, cache } = decodeSessionFile(bytes, opts.loadCache);
      let rest: number[] = header?.pending ?? [];
      if (text !== undefined) {
        if (opts.chat !== undefined && header) {
          // A chat transcript holds the whole conversation: the cached tokens must begin it.
          const all = encode(text, opts.bos ?? true);
          const have = [...header.tokens, ...header.pending];
          check(
            have.length < all.length && have.every((t, i) => all[i] === t),
            'config',
            `${opts.chat}: the chat does not begin with the ${have.length} tokens cached in ${opts.loadCache}; pass the new turn with --prompt instead`,
          );
          rest = all.slice(header.tokens.length);
        } else rest = [...rest, ...encode(text, false)];
      }
      check(rest.length > 0, 'config', `${opts.loadCache} holds no pending token to continue from: pass --prompt TEXT to feed after it`);
      session = await Session.resume(lm, cache, { ...(header ? { tokens: header.tokens } : {}), remainingTokens: rest });
      promptTokens = rest.length;
    } else {
      check(text !== undefined, 'config', 'pass --prompt TEXT or --chat FILE (or --load-cache FILE to continue a saved session)');
      const ids = encode(text, opts.bos ?? true);
      session = await Session.start(lm, strategy ? { strategy } : {});
      await session.prefill(ids);
      const c = await session.compress();
      promptTokens = ids.length;
      const ratio = denseCacheBytes(c.layout, ids.length) / c.byteSize();
      compressedNote = `; the prompt's ${ids.length} tokens compressed ${ratio.toFixed(2)}× against dense fp16 (kvpress compression_ratio ${compressionRatioOf(ratio).toFixed(3)})`;
    }
    const covered = session.tokens;
    const write = io.write ?? io.out;
    const stream = textStream(tokenizer, covered && covered.length ? [covered[covered.length - 1]] : [], write);
    const gen = session.generate({ maxTokens, sampling: temperature > 0 ? { temperature, seed } : 'greedy' });
    let r = await gen.next();
    while (!r.done) {
      stream(r.value);
      r = await gen.next();
    }
    write('\n');
    const c = session.cache;
    let saved = '';
    if (opts.saveCache) {
      check(session.tokens !== undefined, 'config', 'cannot save: the token ids of the loaded cache are unknown (it had no session header)');
      const header: SessionFileHeader = {
        format: 'kvpack-session',
        version: 2,
        tokens: [...(session.tokens ?? [])],
        pending: [...session.pendingTokens],
        strategy: c.strategy,
        ...(c.model ? { model: c.model } : {}),
      };
      const file = encodeSessionFile(header, await c.serializeAsync());
      const tmp = `${opts.saveCache}.tmp-${process.pid}`;
      try {
        writeFileSync(tmp, file);
        renameSync(tmp, opts.saveCache);
      } catch (e) {
        throw new KvpackError('io', `cannot write ${opts.saveCache}: ${(e as Error).message}`, { cause: e });
      }
      saved = `; saved ${file.length} bytes to ${opts.saveCache}`;
    }
    io.err(
      `kvpack generate: ${r.value.ids.length} tokens (${r.value.stopReason}) after ${promptTokens} fed; ${c.strategy} cache of ${session.position} positions, ` +
        `${c.byteSize()} bytes${compressedNote}; backend ${choice.name}${saved}`,
    );
    return 0;
  } finally {
    session?.dispose();
    model.dispose();
  }
}
