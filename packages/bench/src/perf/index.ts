// The perf suite: `kvpack bench perf` and `kvpack bench structure` (see PERF.md).
export * from './stats.js';
export * from './synthetic.js';
export * from './structure.js';
export * from './real.js';
export * from './settings.js';
export * from './decode-modes.js';
export * from './suite.js';
export * from './report.js';
export * from './command.js';
export * from './dense-step.js';
export * from './peer.js';
export * from './model-decode.js';
export * from './half-matmul.js';
