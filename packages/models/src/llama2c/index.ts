export * from './checkpoint.js';
export * from './tokenizer.js';
