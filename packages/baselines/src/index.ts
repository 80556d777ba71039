export {};
export * from './svd/index.js';
export * from './quant/index.js';
export * from './kivi/index.js';
export * from './minicache/index.js';
export * from './streamingllm/index.js';
export * from './snapkv/index.js';
