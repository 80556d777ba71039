// Types of tfjs's chained ops (x.reshape(), …) for this package's build; @kvpack/core registers them.
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';
// @kvpack/bench: cross-strategy KV-cache compression benchmarks, reports and plots.
export * from './grid.js';
export * from './config.js';
export * from './metrics.js';
export * from './model.js';
export * from './runner.js';
export * from './report.js';
export * from './plot.js';
export * from './regression.js';
export * from './progress.js';
export * from './load.js';
export * from './commands.js';
export * from './program.js';
export * from './generate.js';
export * from './accuracy/index.js';
export * from './needle.js';
export * from './needle-command.js';
// The perf suite (`kvpack bench perf`, `kvpack bench structure`; see PERF.md).
export * from './perf/index.js';
// metrics' median (the perf suite's checked median stays internal to it).
export { median } from './metrics.js';
export * from './plugins.js';
export * from './schemas.js';
