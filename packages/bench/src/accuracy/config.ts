import { existsSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { KvpackError, readConfigFile } from '@kvpack/core';
import { z } from 'zod';
import { PluginsSchema } from '../plugins.js';
import { BenchConfigSchema, formatZodError, itemCountSchema, resolveSettings, tokenCountSchema, type ResolvedSetting } from '../config.js';

/** A strategy entry: the quality bench's syntax (name, options grid, zip, label, series, seriesBy, observationWindow). */
const StrategyEntrySchema = BenchConfigSchema.shape.strategies.element;

/**
 * The accuracy bench config (YAML or JSON). `model`, `tokenizer` and `eval` are relative to
 * `modelsDir` (relative to the config file; env KVPACK_MODELS_DIR replaces it), or to the config
 * file when there is no `modelsDir`.
 */
export const AccuracyConfigSchema = z.strictObject({
  /** Free text shown in reports. */
  title: z.string().optional(),
  /** Folder holding the models, relative to the config file. Overridden by env KVPACK_MODELS_DIR. */
  modelsDir: z.string().optional(),
  /** Model checkpoint or folder (Hugging Face folder, GGUF, llama2.c .bin). */
  model: z.string().min(1),
  /** Where the model comes from: printed when its files are absent. */
  modelSource: z.string().optional(),
  /** Tokenizer file, when the model carries none and the eval set has text only. */
  tokenizer: z.string().min(1).optional(),
  /** JSONL eval set: `input_ids` + `answer_ids` or `input` + `answer`, optional `task`. */
  eval: z.string().min(1),
  /** Tasks to run, in this order (default: every task in the file). */
  tasks: z.array(z.string().min(1)).min(1).optional(),
  /** Examples per task (the first ones in the file; default: all); at most 2^20. */
  limit: itemCountSchema().optional(),
  /** Prepend the tokenizer's BOS to tokenized `input` text (default false: RULER-style prompts carry it). */
  bos: z.boolean().default(false),
  /** End an answer at the model's EOS (the EOS is part of the prediction). Default true. */
  stopAtEos: z.boolean().default(true),
  /** Other ids that end an answer (included in the prediction). */
  stopIds: z.array(z.int().nonnegative()).default([]),
  /** Cap on generated tokens; by default each example decodes exactly len(answer_ids) tokens; at most 2^20. */
  maxNewTokens: tokenCountSchema().optional(),
  /**
   * How the prompt's last token is handled:
   * - `decode` (default): the prompt minus its last token is prefilled and compressed, and the last
   *   prompt token is decoded through the compressed cache — every answer token is predicted through it;
   * - `prefill`: the whole prompt is prefilled and compressed; the first answer token comes from the
   *   prefill's exact logits (as `LlamaModel.generate` does).
   */
  lastToken: z.enum(['decode', 'prefill']).default('decode'),
  /** Query rows (the prompt's last tokens) for the attention-output error; 0 skips it. Default 8. */
  attentionQueries: tokenCountSchema(0).default(8),
  /**
   * Split each prompt into context and question (kvpress's protocol): `{ field: question }` (the
   * line's context is `input`/`input_ids`, the question this field: text or ids) or
   * `{ separator: "what is" }` (the question starts at the separator's last occurrence in the
   * prompt's ids; text is tokenized without BOS; a list of texts are alternatives, the latest
   * occurrence wins; or give ids).
   */
  question: z
    .union([
      z.strictObject({ field: z.string().min(1).describe('JSONL field holding the question (text, tokenized without BOS, or token ids); `input`/`input_ids` is then the context.') }),
      z.strictObject({
        separator: z
          .union([z.string().min(1), z.array(z.string().min(1)).min(1), z.array(z.int().nonnegative()).min(1)])
          .describe("Where the question starts: the last occurrence of this text (tokenized without BOS), of any of these texts, or of these token ids in the prompt's ids."),
      }),
    ])
    .optional(),
  /**
   * Query modes to run: `agnostic` (the context is compressed alone, the question read through the
   * compressed cache; needs `question`) and `aware` (the question is compressed with the context).
   * Default: both when `question` is set, else `aware`.
   */
  queryModes: z.array(z.enum(['agnostic', 'aware'])).min(1).optional(),
  /**
   * Also write kvpress's leaderboard layout (one folder per run, a summary table and plot) under
   * OUT/<leaderboard.dir or the config's name>-leaderboard. `dataset` (default `ruler`), `dataDir`
   * (the context length; default: the digits of the eval file's name, e.g. eval_1024 → 1024), `model`
   * (default: the model folder's name).
   */
  leaderboard: z
    .strictObject({
      dataset: z.string().min(1).default('ruler').describe("kvpress's `dataset` (first part of each run folder's name)."),
      dataDir: z.string().min(1).optional().describe("kvpress's `data_dir`: the context length (default: the digits of the eval file's name)."),
      model: z.string().min(1).optional().describe("Model name in the folder names (default: the model folder's name)."),
      dir: z.string().min(1).optional().describe('Folder under --out for the run folders (default `<config name>-leaderboard`).'),
    })
    .optional(),
  /** Free-text notes printed under the table (e.g. model-specific caveats). */
  notes: z.array(z.string()).optional(),
  /** Modules to import first, so that third-party strategies register (see plugins.ts). */
  plugins: PluginsSchema.optional(),
  strategies: z.array(StrategyEntrySchema).min(1),
});
export type AccuracyConfigInput = z.input<typeof AccuracyConfigSchema>;
export type AccuracyConfigData = z.output<typeof AccuracyConfigSchema>;

/** A loaded, validated accuracy config with absolute paths and expanded settings. */
export interface AccuracyConfig {
  /** Absolute path of the config file (or '<inline>'). */
  source: string;
  data: AccuracyConfigData;
  modelPath: string;
  tokenizerPath?: string;
  evalPath: string;
  settings: ResolvedSetting[];
}

/**
 * Validates a raw accuracy config and resolves its paths against `baseDir`. The strategy grid is
 * expanded with the quality bench's {@link expandGrid}, each setting checked against its strategy's
 * schema (register strategies first: import @kvpack/xkv and @kvpack/baselines).
 * @throws KvpackError('config' | 'unknown-strategy') naming the offending key or setting.
 */
export function resolveAccuracyConfig(raw: unknown, baseDir: string, source = '<inline>', env: NodeJS.ProcessEnv = process.env): AccuracyConfig {
  const r = AccuracyConfigSchema.safeParse(raw);
  if (!r.success) throw new KvpackError('config', `invalid accuracy config ${source}:\n${formatZodError(r.error)}`);
  const data = r.data;
  const modelsDir = env.KVPACK_MODELS_DIR ? resolve(env.KVPACK_MODELS_DIR) : data.modelsDir ? resolve(baseDir, data.modelsDir) : baseDir;
  const at = (p: string) => (isAbsolute(p) ? p : resolve(modelsDir, p));
  const settings = resolveSettings(data.strategies, source);
  if (data.queryModes?.includes('agnostic') && !data.question)
    throw new KvpackError('config', `invalid accuracy config ${source}:\nqueryModes: "agnostic" needs "question" (a field or a separator) to split the prompts`);
  return {
    source,
    data,
    modelPath: at(data.model),
    ...(data.tokenizer ? { tokenizerPath: at(data.tokenizer) } : {}),
    evalPath: at(data.eval),
    settings,
  };
}

/** Reads and validates an accuracy config file (.yaml, .yml or .json). @throws KvpackError */
export function loadAccuracyConfig(path: string, env: NodeJS.ProcessEnv = process.env): AccuracyConfig {
  const abs = resolve(path);
  if (!existsSync(abs)) throw new KvpackError('io', `config file ${abs} does not exist`);
  return resolveAccuracyConfig(readConfigFile(abs), dirname(abs), abs, env);
}
