export * from './kvdump.js';
