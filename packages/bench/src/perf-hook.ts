import type { Command } from 'commander';
import { KvpackError } from '@kvpack/core';

/**
 * Hook for `kvpack bench perf` (throughput / latency benchmarks, owned by the perf runner). It
 * receives the `bench` command and adds a `perf` subcommand to it; `kvpack bench perf …` then runs
 * that subcommand while `kvpack bench CONFIG` runs the quality bench. Replace this placeholder's
 * body with the real command.
 */
export function registerPerfCommand(bench: Command): void {
  bench
    .command('perf')
    .description('throughput and latency benchmarks (not available in this build)')
    .allowUnknownOption()
    .allowExcessArguments()
    .action(() => {
      throw new KvpackError('unsupported', 'kvpack bench perf is not available in this build');
    });
}
