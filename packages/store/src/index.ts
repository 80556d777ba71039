export * from './keys.js';
export * from './record.js';
export * from './backend.js';
export * from './fs-backend.js';
export * from './redis-backend.js';
export * from './store.js';
export * from './url.js';
export * from './admin.js';
