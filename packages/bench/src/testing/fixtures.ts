import type { SettingResult } from '../runner.js';

/** A made-up setting result for rendering tests. */
export function fakeResult(over: Partial<SettingResult> = {}): SettingResult {
  return {
    label: 'xkv layersPerGroup=2',
    name: 'xkv',
    series: 'xkv',
    key: 'xkv {"layersPerGroup":2}',
    options: { layersPerGroup: 2 },
    resolvedOptions: { layersPerGroup: 2 },
    observationWindow: null,
    tokens: 100,
    bytes: 1000,
    denseBytes: 4000,
    ratio: 4,
    compressionRatio: 0.75,
    targetRatio: null,
    paperRatio: 3.5,
    keyError: 0.12345,
    valueError: 0.5,
    nll: 1.25,
    nllReference: 1.2,
    deltaNll: 0.05,
    top1Agreement: 0.875,
    agreement: 0.75,
    firstDivergence: 3,
    compressMs: 12.34,
    perPrompt: [],
    ...over,
  };
}
