import { existsSync, readFileSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { KvpackError, MAX_ITEMS, MAX_REPEATS, MAX_TOKENS, atMost, readConfigFile } from '@kvpack/core';
import { z } from 'zod';
import { PluginsSchema } from './plugins.js';
import { expandGrid, type Setting } from './grid.js';
import { resolveStrategy, type ResolvedStrategy } from './strategy.js';

const positiveInt = z.number().int().positive();
/**
 * A token count (prompt length cap, continuation, decode length, query window): at most 2^20 (core
 * MAX_TOKENS; one layer's keys at 2^20 tokens already fill the wasm heap).
 */
export const tokenCountSchema = (min: 0 | 1 = 1) =>
  z
    .number()
    .int()
    .min(min)
    .max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'tokens') });
/** Timing repeats: at most 1,000 (core MAX_REPEATS; the median of more does not move). */
export const repeatCountSchema = () => positiveInt.max(MAX_REPEATS, { error: atMost(MAX_REPEATS, 'repeats; the median of more does not move') });
/** A count of prompts or examples: at most 2^20 (core MAX_ITEMS). */
export const itemCountSchema = () => positiveInt.max(MAX_ITEMS, { error: atMost(MAX_ITEMS, 'items') });

/** One prompt source. Exactly one of `text`, `file`, `ids`, or `prompt` + `continuation`. */
const PromptSchema = z.union([
  z.strictObject({
    /** Whole text; its last `continuationTokens` tokens are held out as the continuation. */
    text: z.string().min(1),
    continuationTokens: tokenCountSchema().optional(),
    maxTokens: tokenCountSchema().optional(),
    name: z.string().optional(),
  }),
  z.strictObject({
    /** A UTF-8 text file (relative to the config file), split like `text`. */
    file: z.string().min(1),
    continuationTokens: tokenCountSchema().optional(),
    maxTokens: tokenCountSchema().optional(),
    name: z.string().optional(),
  }),
  z.strictObject({
    /** Explicit split: the prompt and its held-out continuation. */
    prompt: z.string().min(1),
    continuation: z.string().min(1),
    name: z.string().optional(),
  }),
  z.strictObject({
    /** Token ids (BOS is not added); the last `continuationTokens` are held out. */
    ids: z
      .array(z.number().int().nonnegative())
      .min(2)
      .max(MAX_TOKENS, { error: atMost(MAX_TOKENS, 'token ids') }),
    continuationTokens: tokenCountSchema().optional(),
    name: z.string().optional(),
  }),
]);
export type PromptInput = z.infer<typeof PromptSchema>;
/** A prompt after loading: `file` prompts are read into `text`. */
export type PromptSpec = Exclude<PromptInput, { file: string }>;

const GridValue = z.unknown();
const StrategyEntrySchema = z.strictObject({
  name: z.string().min(1),
  options: z.record(z.string(), GridValue).optional(),
  zip: z.record(z.string(), z.array(z.unknown())).optional(),
  label: z.string().min(1).optional(),
  series: z.string().min(1).optional(),
  seriesBy: z.union([z.string(), z.array(z.string())]).optional(),
  /** Query window (tokens) to prefill with for query-aware strategies; overrides the automatic choice. */
  observationWindow: tokenCountSchema().optional(),
});

/** Settings that `--quick` overrides. */
const QuickSchema = z.strictObject({
  decodeTokens: tokenCountSchema(0).optional(),
  continuationTokens: tokenCountSchema().optional(),
  maxPrompts: itemCountSchema().optional(),
  repeats: repeatCountSchema().optional(),
});

/**
 * The bench config (YAML or JSON). Paths are relative to the config file; `model` and `tokenizer`
 * are relative to `modelsDir` when it is set (env KVPACK_MODELS_DIR replaces `modelsDir`).
 */
export const BenchConfigSchema = z.strictObject({
  /** Free text shown in reports. */
  title: z.string().optional(),
  /** Folder holding the models, relative to the config file. Overridden by env KVPACK_MODELS_DIR. */
  modelsDir: z.string().optional(),
  /** Model checkpoint or folder (llama2.c .bin, Hugging Face folder, GGUF). */
  model: z.string().min(1),
  /** Where the model comes from: free text printed when the model files are absent. */
  modelSource: z.string().optional(),
  /** Tokenizer file when the model does not carry one (llama2.c tok*.bin). */
  tokenizer: z.string().min(1).optional(),
  /** Prepend the tokenizer's BOS to text prompts. Default true. */
  bos: z.boolean().default(true),
  prompts: z.array(PromptSchema).min(1),
  /** Default held-out continuation length (tokens) of text prompts; at most 2^20. */
  continuationTokens: tokenCountSchema().default(32),
  /** Greedy tokens decoded after the prompt, compared with the uncompressed run (0 = skip); at most 2^20. */
  decodeTokens: tokenCountSchema(0).default(32),
  /** Compress timing repeats (median reported); --quick uses 1; at most 1,000. */
  repeats: repeatCountSchema().default(3),
  quick: QuickSchema.optional(),
  /** Modules to import first, so that third-party strategies register (see plugins.ts). */
  plugins: PluginsSchema.optional(),
  strategies: z.array(StrategyEntrySchema).min(1),
});
export type BenchConfigInput = z.input<typeof BenchConfigSchema>;
export type BenchConfigData = z.output<typeof BenchConfigSchema>;

/** A setting of a loaded config: the grid point plus its schema-checked options. */
export interface ResolvedSetting extends Setting, ResolvedStrategy {
  /** Options after the strategy schema (defaults applied); strategies are built from these. */
  resolvedOptions: Record<string, unknown>;
  /** Query window forced by the config, if any. */
  observationWindow?: number;
}

/** A loaded, validated config with absolute paths and expanded settings. */
export interface BenchConfig {
  /** Absolute path of the config file (or '<inline>'). */
  source: string;
  data: BenchConfigData;
  modelPath: string;
  tokenizerPath?: string;
  /** Prompts with `file` read and paths resolved. */
  prompts: PromptSpec[];
  settings: ResolvedSetting[];
}

/** Formats zod issues as `path: message` lines. */
export function formatZodError(err: z.ZodError): string {
  return err.issues
    .map((i) => {
      const path = i.path.length ? i.path.map((p) => (typeof p === 'number' ? `[${p}]` : `.${String(p)}`)).join('').replace(/^\./, '') : '(root)';
      if (i.code === 'unrecognized_keys') return `${path}: unknown key${i.keys.length > 1 ? 's' : ''} ${i.keys.map((k) => `"${k}"`).join(', ')}`;
      if (i.code === 'invalid_union') {
        const first = (i as unknown as { errors?: z.core.$ZodIssue[][] }).errors?.map((e) => e.map((x) => x.message).join('; '));
        return `${path}: ${i.message}${first?.length ? ` (${first.join(' | ')})` : ''}`;
      }
      return `${path}: ${i.message}`;
    })
    .join('\n');
}

function explainPromptUnion(raw: unknown): string | null {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) return 'each prompt must be an object';
  const keys = Object.keys(raw);
  const kinds = ['text', 'file', 'prompt', 'ids'].filter((k) => keys.includes(k));
  if (kinds.length === 0) return 'a prompt needs one of: text, file, prompt + continuation, ids';
  if (kinds.length > 1) return `a prompt takes one source, got ${kinds.join(' and ')}`;
  return null;
}

/**
 * Validates a raw config object (already parsed from YAML/JSON) and resolves its paths against
 * `baseDir`. Strategy options are checked against each registered strategy's schema, so strategies
 * must be registered (import @kvpack/xkv and @kvpack/baselines) before calling this.
 * @throws KvpackError('config' | 'unknown-strategy' | 'io') naming the offending key.
 */
export function resolveConfig(raw: unknown, baseDir: string, source = '<inline>', env: NodeJS.ProcessEnv = process.env): BenchConfig {
  const r = BenchConfigSchema.safeParse(raw);
  if (!r.success) {
    const lines = r.error.issues.map((i) => {
      if (i.code === 'invalid_union' && i.path[0] === 'prompts' && typeof i.path[1] === 'number') {
        const why = explainPromptUnion((raw as { prompts: unknown[] }).prompts[i.path[1]]);
        if (why) return `prompts[${i.path[1]}]: ${why}`;
      }
      return formatZodError(new z.ZodError([i]));
    });
    throw new KvpackError('config', `invalid bench config ${source}:\n${lines.join('\n')}`);
  }
  const data = r.data;
  const modelsDir = env.KVPACK_MODELS_DIR ? resolve(env.KVPACK_MODELS_DIR) : data.modelsDir ? resolve(baseDir, data.modelsDir) : baseDir;
  const at = (p: string) => (isAbsolute(p) ? p : resolve(modelsDir, p));
  const prompts: PromptSpec[] = data.prompts.map((p, i) => {
    if (!('file' in p)) return p as PromptSpec;
    const file = resolve(baseDir, p.file);
    if (!existsSync(file)) throw new KvpackError('io', `${source}: prompts[${i}].file ${file} does not exist`);
    const text = readFileSync(file, 'utf8');
    return { text, continuationTokens: p.continuationTokens, maxTokens: p.maxTokens, name: p.name ?? p.file };
  });
  const settings = resolveSettings(data.strategies, source);
  return {
    source,
    data,
    modelPath: at(data.model),
    tokenizerPath: data.tokenizer ? at(data.tokenizer) : undefined,
    prompts,
    settings,
  };
}

/** Reads and validates a bench config file (.yaml, .yml or .json). @throws KvpackError */
export function loadConfig(path: string, env: NodeJS.ProcessEnv = process.env): BenchConfig {
  const abs = resolve(path);
  if (!existsSync(abs)) throw new KvpackError('io', `config file ${abs} does not exist`);
  return resolveConfig(readConfigFile(abs), dirname(abs), abs, env);
}

/** Applies `--quick`: the config's `quick` block, and one compress repeat unless it says otherwise. */
export function quickOverrides(cfg: BenchConfig): { decodeTokens: number; continuationTokens: number; maxPrompts: number; repeats: number } {
  const q = cfg.data.quick ?? {};
  return {
    decodeTokens: q.decodeTokens ?? cfg.data.decodeTokens,
    continuationTokens: q.continuationTokens ?? cfg.data.continuationTokens,
    maxPrompts: q.maxPrompts ?? cfg.prompts.length,
    repeats: q.repeats ?? 1,
  };
}

/**
 * Expands a config's strategy grid and validates every setting's options against its strategy's
 * schema (defaults applied). Shared by the quality and accuracy benches.
 * @throws KvpackError naming the config file and the setting.
 */
export function resolveSettings(strategies: BenchConfigData['strategies'], source: string): ResolvedSetting[] {
  const entries = strategies.map((e) => ({ ...e, seriesBy: typeof e.seriesBy === 'string' ? [e.seriesBy] : e.seriesBy }));
  const settings: ResolvedSetting[] = [];
  for (const s of expandGrid(entries)) {
    let resolvedOptions: Record<string, unknown>;
    try {
      resolvedOptions = resolveStrategy(s.name, s.options).resolvedOptions;
    } catch (err) {
      if (err instanceof KvpackError) throw new KvpackError(err.code, `${source}: setting "${s.label}": ${err.message}`, { cause: err });
      throw err;
    }
    settings.push({ ...s, resolvedOptions, observationWindow: entries[s.entry].observationWindow });
  }
  return settings;
}
