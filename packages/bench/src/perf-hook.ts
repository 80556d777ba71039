import type { Command } from 'commander';
import { registerPerfCommands } from './perf/command.js';

/**
 * Hook for the perf runner: adds `kvpack bench perf` (the performance suite on Llama-3.1-8B-shaped
 * caches) and `kvpack bench structure` (synthetic-vs-real cache structure) to the `bench`
 * command. Both exit 0 on success; bad options throw KvpackError, which the CLI turns into exit 2.
 * See packages/bench/PERF.md.
 */
export function registerPerfCommand(bench: Command): void {
  registerPerfCommands(bench, () => {});
}
