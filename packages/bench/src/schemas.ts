import { StrategyConfigSchema, getStrategyDefinition, listStrategies } from '@kvpack/core';
import { z } from 'zod';
import { AccuracyConfigSchema } from './accuracy/config.js';
import { BenchConfigSchema } from './config.js';

type Shape = Record<string, z.ZodType>;

/** Attaches descriptions to an object schema's fields (zod's global registry; `z.toJSONSchema` reads it). */
function describeFields(schema: { shape: Shape }, descriptions: Record<string, string>): void {
  for (const [key, description] of Object.entries(descriptions)) {
    const field = schema.shape[key];
    if (!field) throw new Error(`schema has no field "${key}"`);
    z.globalRegistry.add(field, { ...(z.globalRegistry.get(field) ?? {}), description });
  }
}

const entry = BenchConfigSchema.shape.strategies.element as unknown as { shape: Shape };
const quick = (BenchConfigSchema.shape.quick as unknown as { unwrap(): { shape: Shape } }).unwrap();
const promptOptions = (BenchConfigSchema.shape.prompts.element as unknown as { options: { shape: Shape }[] }).options;

const PATHS = 'relative to `modelsDir` when set (env KVPACK_MODELS_DIR replaces it), else to the config file';
describeFields(BenchConfigSchema as unknown as { shape: Shape }, {
  title: 'Free text shown in reports.',
  modelsDir: 'Folder holding the models, relative to the config file. Env KVPACK_MODELS_DIR replaces it.',
  model: `Model checkpoint or folder: llama2.c .bin, Hugging Face Llama folder, or GGUF file; ${PATHS}.`,
  modelSource: 'Where the model comes from: free text printed when the model files are absent.',
  tokenizer: `Tokenizer file when the model carries none (llama2.c tok*.bin); ${PATHS}.`,
  bos: "Prepend the tokenizer's BOS to text prompts.",
  prompts: 'Prompts; each gives one prefill and a held-out continuation that is scored.',
  continuationTokens: 'Default held-out continuation length of text prompts, in tokens (at most 2^20).',
  decodeTokens: 'Greedy tokens decoded after the prompt and compared with the uncompressed run (0 skips; at most 2^20).',
  repeats: 'Compress timing repeats; the median is reported (--quick uses 1; at most 1,000).',
  quick: 'Overrides applied by --quick.',
  plugins: 'Modules imported first so that third-party strategies register: package names (resolved from the config folder) or paths relative to it.',
  strategies: 'Strategy entries; each expands to a grid of settings (cartesian product of list-valued options, zipped lists in `zip`).',
});
describeFields(quick, {
  decodeTokens: 'Greedy tokens under --quick.',
  continuationTokens: 'Held-out continuation length under --quick.',
  maxPrompts: 'Prompts used under --quick (the first ones).',
  repeats: 'Compress repeats under --quick (default 1).',
});
describeFields(entry, {
  name: 'Registered strategy name (`kvpack strategies` lists them).',
  options: "Strategy options; a list value is a grid axis (one setting per value). Checked against the strategy's schema.",
  zip: 'Lists of equal length varied together (one setting per index), e.g. { rankK: [4, 8], rankV: [6, 12] }.',
  label: "Row label in the report (default: the name plus the options that vary).",
  series: 'Plot line the settings belong to (default: the label without the varying option).',
  seriesBy: 'Option name(s) whose value splits the settings into separate plot lines.',
  observationWindow: 'Query window (tokens) to prefill with for query-aware strategies; overrides the automatic choice.',
});
for (const p of promptOptions) {
  const d: Record<string, string> = {
    text: 'Whole text; its last `continuationTokens` tokens are held out as the continuation.',
    file: 'A UTF-8 text file (relative to the config file), split like `text`.',
    prompt: 'Prompt text of an explicit split (with `continuation`).',
    continuation: 'Held-out continuation text of an explicit split.',
    ids: 'Token ids (BOS is not added); the last `continuationTokens` are held out.',
    continuationTokens: 'Held-out continuation length of this prompt, in tokens.',
    maxTokens: 'Cap on the prompt length in tokens (the text is cut from the start).',
    name: 'Name shown in reports.',
  };
  describeFields(p, Object.fromEntries(Object.keys(p.shape).map((k) => [k, d[k]])));
}
describeFields(AccuracyConfigSchema as unknown as { shape: Shape }, {
  title: 'Free text shown in reports.',
  modelsDir: 'Folder holding the models, relative to the config file. Env KVPACK_MODELS_DIR replaces it.',
  model: `Model checkpoint or folder (Hugging Face folder, GGUF, llama2.c .bin); ${PATHS}.`,
  modelSource: 'Where the model comes from: printed when its files are absent.',
  tokenizer: 'Tokenizer file, when the model carries none and the eval set has text only.',
  eval: 'JSONL eval set: `input_ids` + `answer_ids` or `input` + `answer`, optional `task`.',
  tasks: 'Tasks to run, in this order (default: every task in the file).',
  limit: 'Examples per task (the first ones in the file; default all; at most 2^20).',
  bos: "Prepend the tokenizer's BOS to tokenized `input` text (RULER-style prompts carry it).",
  stopAtEos: "End an answer at the model's EOS (the EOS is part of the prediction).",
  stopIds: 'Other ids that end an answer (included in the prediction).',
  maxNewTokens: 'Cap on generated tokens; by default each example decodes exactly len(answer_ids) tokens.',
  lastToken: '`decode`: the prompt minus its last token is prefilled and compressed and the last token decoded through the compressed cache; `prefill`: the whole prompt is prefilled.',
  attentionQueries: "Query rows (the prompt's last tokens) for the attention-output error; 0 skips it.",
  question: 'Split each prompt into context and question (kvpress protocol): `{ field }` or `{ separator }`.',
  queryModes: 'Query modes to run: `agnostic` (the context compressed alone, the question read through the compressed cache; needs `question`) and/or `aware` (the question compressed too). Default: both with `question`, else `aware`.',
  leaderboard: "Also write kvpress's leaderboard layout (a folder per run, leaderboard.md / .json / .svg) under the output folder.",
  notes: 'Free-text notes printed under the table.',
  plugins: 'Modules imported first so that third-party strategies register.',
  strategies: 'Strategy entries, as in the bench config.',
});

/**
 * A strategy options JSON Schema with `compressionRatio` beside `targetRatio` where the options take
 * one: the registry accepts kvpress's compression_ratio (the fraction removed) for it.
 */
export function withCompressionRatio(options: Record<string, unknown>): Record<string, unknown> {
  const props = options.properties as Record<string, unknown> | undefined;
  if (!props || !('targetRatio' in props) || 'compressionRatio' in props) return options;
  return {
    ...options,
    properties: {
      ...props,
      compressionRatio: {
        type: 'number',
        minimum: 0,
        exclusiveMaximum: 1,
        description: "kvpress's compression_ratio (the fraction of the cache removed: 0.5 is 2×, 0.875 is 8×) instead of targetRatio; both given must agree.",
      },
    },
  };
}

const STRATEGY_FIELDS = {
  name: 'Registered strategy name (`kvpack strategies` lists them).',
  options: "Options of the strategy, checked against its schema; omitted ones take their defaults.",
};

/** The JSON Schema of a strategy config file (`{ name, options }`): one branch per registered strategy. */
export function strategyConfigJsonSchema(): Record<string, unknown> {
  const branches = listStrategies().map((name) => {
    const def = getStrategyDefinition(name);
    let options: Record<string, unknown> = { type: 'object' };
    try {
      options = withCompressionRatio(z.toJSONSchema(def.schema, { io: 'input', unrepresentable: 'any' }) as Record<string, unknown>);
      delete options.$schema;
    } catch {
      /* a schema JSON Schema cannot express: any object */
    }
    return {
      type: 'object',
      description: def.description,
      properties: {
        name: { const: name, description: STRATEGY_FIELDS.name },
        options: { ...options, description: STRATEGY_FIELDS.options },
      },
      required: ['name'],
      additionalProperties: false,
    };
  });
  const base = z.toJSONSchema(StrategyConfigSchema, { io: 'input' }) as Record<string, unknown>;
  return {
    $schema: base.$schema,
    title: 'kvpack strategy config',
    description: 'A strategy and its options, as read by createStrategy(file) and the CLI.',
    oneOf: branches,
  };
}

/**
 * JSON Schemas of kvpack's config files, generated from the zod schemas (input side: defaults are
 * optional) with a description on every field, keyed by file name under packages/bench/schemas/.
 * Strategies must be registered first (the strategy schema has one branch per strategy).
 */
export function configJsonSchemas(): Record<string, Record<string, unknown>> {
  const gen = (schema: z.ZodType, title: string, description: string) => ({
    ...(z.toJSONSchema(schema, { io: 'input', unrepresentable: 'any' }) as Record<string, unknown>),
    title,
    description,
  });
  return {
    'bench-config.schema.json': gen(BenchConfigSchema, 'kvpack bench config', 'A `kvpack bench CONFIG` file: model, prompts and the strategy grid.'),
    'accuracy-config.schema.json': gen(AccuracyConfigSchema, 'kvpack accuracy config', 'A `kvpack bench accuracy CONFIG` file: model, eval set and the strategy grid.'),
    'strategy-config.schema.json': strategyConfigJsonSchema(),
  };
}
