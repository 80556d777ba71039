import { runStrategyConformance } from './conformance.js';
import './dense/index.js';

// The dense strategy holds itself to the same contract as every plugin. float32 storage is the
// lossless setting; its "compressing" setting is float16 (ratio 1.0 would fail the ratio check), so
// dense is only checked through the lossless and bookkeeping paths below.
runStrategyConformance('dense', {
  compressing: { storage: 'float16' },
  lossless: { storage: 'float32' },
  losslessTolerance: 1e-6,
  badOptions: [{ storage: 'int3' }],
  ratioAboveOne: false,
});
