// Registers tfjs's chained ops (x.reshape(), x.mul(), …) on Tensor; tfjs-core alone does not.
import './chained.js';
export * from './types.js';
export * from './mla.js';
export * from './errors.js';
export * from './fp16.js';
export * from './rope.js';
export * from './attention.js';
export {
  CONTAINER_VERSION,
  byteView,
  decodeContainer,
  encodeContainer,
  headerBytes,
  payloadBytes,
  type ByteSource,
  type Container,
  type DecodedContainer,
  type StoredDType,
  type StoredTensor,
  type TensorExpectation,
} from './serialize.js';
export { crc32 } from './crc32.js';
export * from './cache.js';
export * from './validate.js';
export * from './memory.js';
export * from './registry.js';
export * from './backend.js';
export * from './webgpu.js';
export * from './linalg.js';
export { SPARSE_SIGN_NONZEROS, sparseSignDense, sparseSignMatrix, sparseSignProductWgsl, sparseSignRowsProductWgsl, type SparseSign } from './sparse-sign.js';
export { GRAM_CHOL_BATCH, GRAM_CHOL_MAX, GRAM_CHOL_SHIFT, gramCholInverseWgsl, gramCholInverseWgslBatch } from './gram-chol-wgsl.js';
export * from './limits.js';
export * from './dense/index.js';
export * from './random.js';
export * from './scope.js';
export * from './half.js';
export * from './define.js';
export * from './prefix-cut.js';
export * from './ratio.js';
