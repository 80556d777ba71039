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
