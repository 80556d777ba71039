export * from './quant.js';
export * from './tokenizer.js';
export * from './load.js';
