export * from './llama.js';
export * from './weights-check.js';
export type { CacheStats, ContinuationScore, GenerateOptions, GenerateResult, GenerationModel, ScoreOptions } from './generation.js';
export * from './session.js';
export * from './sampling.js';
export * from './session-file.js';
export { RECONSTRUCTION_OVERLAP, withReconstructionScores, type ReconstructingModel } from './reconstruction.js';
