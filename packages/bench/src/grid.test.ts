import { describe, expect, it } from 'vitest';
import { KvpackError } from '@kvpack/core';
import { canonicalJson, expandEntry, expandGrid } from './grid.js';

describe('expandEntry', () => {
  it('takes the cartesian product of list-valued options, last key fastest', () => {
    const s = expandEntry({ name: 'xkv', options: { layersPerGroup: [1, 2, 4], rankK: [4, 8], storage: 'float16' } });
    expect(s.map((x) => x.options)).toEqual([
      { storage: 'float16', layersPerGroup: 1, rankK: 4 },
      { storage: 'float16', layersPerGroup: 1, rankK: 8 },
      { storage: 'float16', layersPerGroup: 2, rankK: 4 },
      { storage: 'float16', layersPerGroup: 2, rankK: 8 },
      { storage: 'float16', layersPerGroup: 4, rankK: 4 },
      { storage: 'float16', layersPerGroup: 4, rankK: 8 },
    ]);
    expect(s[3].label).toBe('xkv layersPerGroup=2 rankK=8');
  });

  it('3 × 3 × 3 grid gives 27 distinct settings', () => {
    const s = expandEntry({ name: 'xkv', options: { layersPerGroup: [1, 2, 4], rankK: [4, 8, 16], rankV: [6, 12, 24] } });
    expect(s).toHaveLength(27);
    expect(new Set(s.map((x) => x.key)).size).toBe(27);
  });

  it('zips paired lists and crosses them with the options grid', () => {
    const s = expandEntry({ name: 'xkv', options: { layersPerGroup: [1, 2] }, zip: { rankK: [4, 8, 16], rankV: [6, 12, 24] } });
    expect(s.map((x) => [x.options.layersPerGroup, x.options.rankK, x.options.rankV])).toEqual([
      [1, 4, 6],
      [1, 8, 12],
      [1, 16, 24],
      [2, 4, 6],
      [2, 8, 12],
      [2, 16, 24],
    ]);
  });

  it('wraps literal list values in a one-element list, and a one-value list does not vary the label', () => {
    const s = expandEntry({ name: 'minicache', options: { layers: [[0, 1, 2]], t: [0.6] } });
    expect(s).toHaveLength(1);
    expect(s[0].options).toEqual({ layers: [0, 1, 2], t: 0.6 });
    expect(s[0].label).toBe('minicache');
  });

  it('names series by seriesBy values, and honours label and series', () => {
    const s = expandEntry({ name: 'xkv', label: 'xKV', options: { layersPerGroup: [1, 4], rankK: [4, 8] }, seriesBy: ['layersPerGroup'] });
    expect(s.map((x) => x.series)).toEqual(['xKV layersPerGroup=1', 'xKV layersPerGroup=1', 'xKV layersPerGroup=4', 'xKV layersPerGroup=4']);
    expect(s[0].label).toBe('xKV layersPerGroup=1 rankK=4');
    expect(expandEntry({ name: 'kivi', series: 'KIVI', options: { bits: [2, 4] } }).map((x) => x.series)).toEqual(['KIVI', 'KIVI']);
  });

  it('rejects unequal zip lists, empty lists, keys in both options and zip, unknown seriesBy', () => {
    const bad = [
      { name: 'xkv', zip: { rankK: [4, 8], rankV: [6] } },
      { name: 'xkv', options: { rankK: [] } },
      { name: 'xkv', options: { rankK: [4] }, zip: { rankK: [4], rankV: [6] } },
      { name: 'xkv', options: { rankK: [4] }, seriesBy: ['layersPerGroup'] },
    ];
    const msgs = bad.map((e) => {
      try {
        expandEntry(e as never);
        return 'no error';
      } catch (err) {
        expect(err).toBeInstanceOf(KvpackError);
        return (err as Error).message;
      }
    });
    expect(msgs[0]).toMatch(/equal lengths.*rankK: 2, rankV: 1/);
    expect(msgs[1]).toMatch(/"rankK" is an empty list/);
    expect(msgs[2]).toMatch(/"rankK" appears in both options and zip/);
    expect(msgs[3]).toMatch(/seriesBy names "layersPerGroup"/);
  });
});

describe('expandGrid', () => {
  it('rejects the same setting twice and keeps labels unique', () => {
    expect(() => expandGrid([{ name: 'kivi', options: { bits: [2, 4] } }, { name: 'kivi', options: { bits: 4 } }])).toThrow(/appears twice/);
    const s = expandGrid([
      { name: 'xkv', options: { rankK: 4 } },
      { name: 'xkv', options: { rankK: 8 } },
    ]);
    expect(s.map((x) => x.label)).toEqual(['xkv rankK=4', 'xkv rankK=8']);
    expect(s.map((x) => x.entry)).toEqual([0, 1]);
  });

  it('keys settings by name and canonical (sorted) options', () => {
    const [a] = expandGrid([{ name: 'xkv', options: { rankV: 6, rankK: 4, q: { bits: 4, groupSize: 8 } } }]);
    expect(a.key).toBe('xkv {"q":{"bits":4,"groupSize":8},"rankK":4,"rankV":6}');
    expect(canonicalJson({ b: [1, { d: 1, c: 2 }], a: 'x' })).toBe('{"a":"x","b":[1,{"c":2,"d":1}]}');
  });
});
