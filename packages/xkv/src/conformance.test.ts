import { runStrategyConformance } from '@kvpack/core/conformance';
import './index.js';

// Synthetic cache: T = 64, L = 4, H_kv = 2, d = 16 (H_kv·d = 32). Full rank for G = 4 is min(T, 4·32) = 64 = 16 × 4.
const badOptions = [{ rankK: -1 }, { rankK: 0 }, { rankV: 0 }, { rankV: 1.5 }, { layersPerGroup: 0 }, { storage: 'int3' }, { factorQuantization: { bits: 2 } }, { factorQuantization: { bits: 4, apply: 'all' } }];
runStrategyConformance('xkv', {
  compressing: { rankK: 2, rankV: 3 },
  lossless: { layersPerGroup: 4, rankK: 16, rankV: 16, exact: true },
  badOptions,
  // Synthetic MLA cache: T = 64, L = 4, d_c = 24, d_R = 8; full latent rank for G = 4 is min(64, 4·24) = 64 = 16 × 4.
  mla: { compressing: { mla: { rank: 3 } }, lossless: { layersPerGroup: 4, exact: true, mla: { rank: 16 } } },
  // Group ranks 17 × 4 = 68 > T = 64, and 0.
  failingCompress: [{ rankK: 17 }, { rankK: 2, rankV: 17, powerIters: 16, oversample: 4096 }],
});
runStrategyConformance('xkv', {
  compressing: { layersPerGroup: 2, rankK: 4, rankV: 6, factorQuantization: { bits: 4, quantGroupSize: 16 } },
  lossless: { layersPerGroup: 1, rankK: 32, rankV: 32, factorQuantization: { bits: 8, quantGroupSize: 8, apply: 'factors' } },
  losslessTolerance: 2e-2,
  badOptions,
  // RoPE keys by their own cross-layer SVD, factors quantized.
  mla: {
    compressing: { layersPerGroup: 2, mla: { rank: 4, ropeKeys: 'svd', ropeRank: 2 }, factorQuantization: { bits: 4, quantGroupSize: 16 } },
    lossless: { layersPerGroup: 2, exact: true, storage: 'float32', mla: { rank: 24, ropeKeys: 'svd', ropeRank: 8 } },
    losslessTolerance: 1e-4,
  },
  // G = 2: group rank 33 × 2 = 66 > min(T = 64, 2·32 = 64).
  failingCompress: [{ layersPerGroup: 2, rankK: 33, rankV: 6, factorQuantization: { bits: 4, quantGroupSize: 16 } }],
});
// Sparse decode (landmarks, exact outlier and local tokens stored 16-bit): C = ⌊(64 − 8) / 8⌋ = 7 chunks.
const sparse = { budget: 16, chunkSize: 8, outlierChunks: 1, localTokens: 8 };
runStrategyConformance('xkv', {
  compressing: { rankK: 2, rankV: 3, decode: 'sparse', sparse },
  lossless: { layersPerGroup: 4, rankK: 16, rankV: 16, exact: true, decode: 'sparse', sparse },
  badOptions: [...badOptions, { decode: 'sparse', sparse: { budget: 12 } }, { sparse: { budget: 16 } }],
  failingCompress: [{ rankK: 2, rankV: 17, decode: 'sparse', sparse }],
});
