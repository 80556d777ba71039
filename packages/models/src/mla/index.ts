export * from './config.js';
export * from './weights.js';
export * from './moe.js';
export * from './model.js';
export * from './load.js';
