export * from './types.js';
export * from './llama2c/index.js';
export * from './model/index.js';
export * from './hf/index.js';
export * from './gguf/index.js';
export * from './kvdump/index.js';
export * from './load.js';
