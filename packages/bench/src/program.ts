import { Command, CommanderError } from 'commander';
import { KvpackError } from '@kvpack/core';
import { EXIT, benchCommand, processIO, strategiesCommand, type BenchCommandOptions, type CommandIO } from './commands.js';
import { registerPerfCommand } from './perf-hook.js';
import { registerAccuracyCommand, registerLeaderboardCommand } from './accuracy/command.js';
import { registerNeedleCommand } from './needle-command.js';
import { backendOption } from './environment.js';
import { generateCommand, type GenerateCommandOptions } from './generate.js';
import { registerStoreCommands } from './store-commands.js';
import { KVPACK_VERSION } from './version.js';

/**
 * Builds the `kvpack` command line (commander). Actions store their exit code in `state.code`.
 * Subcommands: `bench CONFIG` (quality bench; `bench perf` is a hook for the perf runner) and
 * `strategies`.
 */
export function buildProgram(io: CommandIO, state: { code: number }): Command {
  const program = new Command('kvpack')
    .description('KV-cache compression benchmarks (xKV and baselines)')
    .version(KVPACK_VERSION)
    .option('--verbose', 'show backend warnings (Dawn/Vulkan adapter notes) and stack traces')
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.out(s), writeErr: (s) => io.err(s) })
    .showHelpAfterError('(run kvpack --help for usage)');

  const bench = program
    .command('bench')
    .description('run a quality benchmark config (YAML/JSON): compression ratio, reconstruction error, ΔNLL, greedy agreement')
    .argument('<config>', 'bench config file (.yaml, .yml or .json), or "perf" for the performance benchmarks')
    .option('--out <dir>', 'folder for the JSON, Markdown and SVG outputs', 'bench-out')
    .addOption(backendOption())
    .option('--quick', "quick run: one compress repeat and the config's `quick` overrides")
    .option('--model <file>', "model checkpoint or folder, instead of the config's")
    .option('--tokenizer <file>', "tokenizer file, instead of the config's")
    .option('--require-model', 'fail (exit 2) when the model files are absent; the default, kept for scripts')
    .option('--baseline <file>', 'compare quality metrics with this baseline JSON (exit 1 on regression)')
    .option('--write-baseline', 'write this run as the baseline to --baseline FILE instead of comparing')
    .option('--tolerance <spec>', 'regression tolerance, e.g. relError=0.05,deltaNll=0.02,agreement=0.05')
    .option('--no-plot', 'skip the SVG plot')
    .option('--json', 'print the report as JSON on stdout instead of the Markdown table')
    .action(async (config: string, opts: BenchCommandOptions) => {
      state.code = await benchCommand(config, opts, io);
    });
  registerPerfCommand(bench);
  registerAccuracyCommand(bench, io, state);
  registerNeedleCommand(bench, io, state);
  registerLeaderboardCommand(bench, io, state);

  program
    .command('generate')
    .description('generate text through a compressed KV cache, streamed to stdout; save the session and continue it later')
    .option('--model <file>', 'model checkpoint or folder (default: the embedded stories260K; $KVPACK_MODELS_DIR overrides)')
    .option('--tokenizer <file>', 'tokenizer file (default: the one the model carries or sits beside)')
    .option('--prompt <text>', 'prompt text; after --load-cache, text fed after the saved tokens')
    .option('--chat <file>', 'chat file: JSON/YAML list of { role, content }, rendered as "role: content" lines and "assistant:"')
    .option('--strategy <file|name>', 'strategy config file (JSON/YAML { name, options }) or a strategy name at its defaults (default: dense, exact)')
    .option('--max-tokens <n>', 'tokens to generate', '64')
    .option('--save-cache <file>', 'write the session (compressed cache + its token ids) to FILE when done')
    .option('--load-cache <file>', 'continue a session saved with --save-cache (or a bare serialized cache, with --prompt)')
    .option('--temperature <t>', 'sampling temperature (0 = greedy)', '0')
    .option('--seed <n>', 'sampling seed', '0')
    .option('--no-bos', 'do not prepend BOS to a new prompt')
    .addOption(backendOption())
    .action(async (opts: GenerateCommandOptions) => {
      state.code = await generateCommand(opts, io);
    });

  program
    .command('strategies')
    .description('list registered compression strategies with their options (bounds, defaults, descriptions)')
    .option('--json', 'print the strategies and their options as JSON (a JSON Schema per strategy)')
    .action(async (opts: { json?: boolean }) => {
      state.code = await strategiesCommand(io, opts);
    });
  registerStoreCommands(program, io, state);
  program.addHelpText('after', () => `\nAll commands:\n${commandList(program).join('\n')}\n`);
  return program;
}

/** Every command and subcommand with its arguments and description, for `kvpack --help`. */
function commandList(program: Command): string[] {
  const rows: [string, string][] = [];
  const walk = (cmd: Command, prefix: string) => {
    for (const c of cmd.commands) {
      if ((c as unknown as { _hidden?: boolean })._hidden) continue;
      const args = c.registeredArguments.map((a) => (a.required ? `<${a.name()}>` : `[${a.name()}]`)).join(' ');
      rows.push([`${prefix}${c.name()}${args ? ` ${args}` : ''}`, c.description()]);
      walk(c, `${prefix}${c.name()} `);
    }
  };
  walk(program, 'kvpack ');
  const w = Math.max(...rows.map(([k]) => k.length));
  return rows.map(([k, d]) => `  ${k.padEnd(w)}  ${d}`);
}

/**
 * Runs the CLI on `argv` (without the node and script entries) and returns the exit code:
 * 0 ok, 1 regression against a baseline, 2 bad input (usage, config, files), 3 internal error.
 * Errors print as one line; set KVPACK_DEBUG=1 for stack traces.
 */
export async function runCli(argv: string[], io: CommandIO = processIO): Promise<number> {
  const state = { code: EXIT.ok as number };
  if (argv.includes('--verbose')) process.env.KVPACK_VERBOSE = '1';
  const program = buildProgram(io, state);
  try {
    await program.parseAsync(argv, { from: 'user' });
    return state.code;
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return EXIT.ok;
      return e.exitCode === 0 ? EXIT.ok : EXIT.badInput; // commander already printed the message
    }
    if (process.env.KVPACK_DEBUG || process.env.KVPACK_VERBOSE) io.err((e as Error).stack ?? String(e));
    if (e instanceof KvpackError) {
      io.err(`kvpack: error: ${e.message}`);
      return EXIT.badInput;
    }
    io.err(`kvpack: internal error: ${(e as Error)?.message ?? String(e)} (set KVPACK_DEBUG=1 for the stack trace)`);
    return EXIT.internal;
  }
}
