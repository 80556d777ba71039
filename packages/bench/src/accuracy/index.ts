// RULER-style accuracy bench: JSONL eval sets, exact-match scoring per task, the
// attention-output error, and `kvpack bench accuracy`.
export * from './scoring.js';
export * from './dataset.js';
export * from './attention-error.js';
export * from './config.js';
export * from './runner.js';
export * from './report.js';
export * from './command.js';
export * from './kvdump.js';
export * from './csv.js';
export * from './leaderboard.js';
