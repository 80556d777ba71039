export * from './safetensors.js';
export * from './config.js';
export * from './tokenizer.js';
export * from './weights.js';
export * from './load.js';
