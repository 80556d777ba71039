export * from './llama.js';
export * from './sampling.js';
