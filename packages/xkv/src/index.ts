// Importing this package registers the `xkv` strategy.
export * from './quant.js';
export * from './ratio.js';
export * from './group-svd.js';
export * from './xkv.js';
