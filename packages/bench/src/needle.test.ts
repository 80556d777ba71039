import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { denseCacheBytes, selectBackend } from '@kvpack/core';
import '@kvpack/xkv';
import '@kvpack/baselines';
import { resolveSettings } from './config.js';
import type { CommandIO } from './commands.js';
import { defaultModelPaths } from './generate.js';
import { loadBenchModel, type LoadedBenchModel } from './load.js';
import type { BenchTokenizer } from './model.js';
import { needleHeatmapSvg, needlePrompt, runNeedleSweep, type NeedleSweep } from './needle.js';
import { runCli } from './program.js';
import type { AccuracyModel } from './accuracy/runner.js';

/** Whitespace word tokenizer over a growing vocabulary; BOS is id 1. */
function wordTokenizer(): BenchTokenizer & { words: string[] } {
  const words = ['<pad>', '<bos>'];
  const id = (w: string) => (words.includes(w) ? words.indexOf(w) : words.push(w) - 1);
  return { words, bosId: 1, encode: (t) => t.split(/\s+/).filter(Boolean).map(id), decode: (ids) => ids.map((i) => words[i]).join(' ') };
}

describe('needle prompts', () => {
  const tok = wordTokenizer();
  const filler = ['a b c .', 'd e .', 'f g h i .'];
  const enc = (t: string) => tok.encode(t);

  it('exactly `length` tokens: BOS, the haystack cut to fit, the needle at the nearest sentence boundary, the question last', () => {
    const needle = enc('the special magic number for key is : 1 2 3 .');
    const question = enc('what is the special magic number for key ? answer :');
    for (const length of [40, 41, 57]) {
      const room = length - 1 - needle.length - question.length;
      for (const depth of [0, 0.3, 0.5, 1]) {
        const p = needlePrompt(tok, { length, depth, key: 'key', value: '123', filler });
        expect(p.inputIds).toHaveLength(length);
        expect(p.inputIds[0]).toBe(1);
        expect(p.inputIds.slice(p.needleStart, p.needleStart + needle.length)).toEqual(needle);
        expect(p.inputIds.slice(-question.length)).toEqual(question);
        expect(p.contextTokens).toBe(length - question.length);
        expect(p.answerIds).toEqual(enc('1 2 3 .'));
        // Haystack = the filler cycled and cut to `room` tokens; the needle sits at a whole-sentence
        // boundary nearest to depth × room (closed form over the cycled sentence lengths 4, 3, 5).
        const hay = [...p.inputIds.slice(1, p.needleStart), ...p.inputIds.slice(p.needleStart + needle.length, length - question.length)];
        const cycled = Array.from({ length: 20 }, (_, i) => enc(filler[i % 3])).flat().slice(0, room);
        expect(hay).toEqual(cycled);
        const bounds = [0];
        for (let i = 0; bounds[bounds.length - 1] + [4, 3, 5][i % 3] <= room; i++) bounds.push(bounds[bounds.length - 1] + [4, 3, 5][i % 3]);
        const best = Math.min(...bounds.map((b) => Math.abs(b - depth * room)));
        expect(Math.abs(p.needleStart - 1 - depth * room)).toBe(best);
        expect(bounds).toContain(p.needleStart - 1);
        expect(p.actualDepth).toBe((p.needleStart - 1) / room);
      }
    }
  });

  it('bad input: depth outside [0, 1], no room for a haystack', () => {
    expect(() => needlePrompt(tok, { length: 40, depth: 1.5, key: 'k', value: '1' })).toThrow(/depth must be in \[0, 1\], got 1.5/);
    expect(() => needlePrompt(tok, { length: 20, depth: 0, key: 'k', value: '1' })).toThrow(/20-token needle prompt leaves no room for the haystack/);
  });

  it('the code-written heatmap has one cell per (length, depth), colored and labeled by value', () => {
    const sweep: NeedleSweep = {
      setting: 's',
      queryMode: 'agnostic',
      samples: 1,
      cells: [
        { length: 64, depth: 0, actualDepth: 0, accuracy: 1, reference: 1, agreement: 1, ratio: 2 },
        { length: 64, depth: 1, actualDepth: 1, accuracy: 0, reference: 1, agreement: 0.5, ratio: 2 },
        { length: 128, depth: 0, actualDepth: 0, accuracy: 0.5, reference: 1, agreement: 1, ratio: 4 },
        { length: 128, depth: 1, actualDepth: 1, accuracy: NaN, reference: 1, agreement: 1, ratio: 4 },
      ],
    };
    const svg = needleHeatmapSvg(sweep);
    expect(svg.match(/<rect /g)).toHaveLength(4);
    expect(svg).toContain('fill="rgb(26,152,80)"'); // 1.00: green
    expect(svg).toContain('fill="rgb(215,48,39)"'); // 0.00: red
    expect(svg).toContain('fill="#dddddd"'); // n/a
    expect([...svg.matchAll(/>(\d\.\d\d|n\/a)<\/text>/g)].map((m) => m[1])).toEqual(['1.00', '0.00', '0.50', 'n/a']);
  });
});

const paths = defaultModelPaths();
const present = existsSync(paths.model) && existsSync(paths.tokenizer);
if (!present) console.warn(`skipping the stories260K needle sweep: ${paths.model} not found (set KVPACK_MODELS_DIR)`);

function capture(): CommandIO & { stdout: string; stderr: string } {
  const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
  return io;
}

describe.skipIf(!present)('needle sweep on stories260K (tiny)', () => {
  let loaded: LoadedBenchModel;
  let start: number;
  beforeAll(async () => {
    await selectBackend('wasm');
    loaded = await loadBenchModel(paths.model, paths.tokenizer);
    start = tf.memory().numTensors;
  });
  afterAll(() => loaded?.model.dispose());

  it('an exact cache agrees with the uncompressed model in every cell; StreamingLLM holds budget of T tokens', async () => {
    const [dense, stream] = resolveSettings(
      [
        { name: 'dense', options: { storage: 'float32' } },
        { name: 'streamingllm', options: { sinks: 4, budget: 16 } },
      ] as never,
      'test',
    );
    const opts = { lengths: [128], depths: [0, 1], digits: 2 };
    const d = await runNeedleSweep(loaded.model as AccuracyModel, loaded.tokenizer!, dense, opts);
    expect(d.cells.map((c) => [c.length, c.depth])).toEqual([
      [128, 0],
      [128, 1],
    ]);
    for (const c of d.cells) {
      expect(c.agreement).toBe(1);
      expect(c.accuracy).toBe(c.reference);
      expect(c.ratio).toBe(0.5);
    }
    const s = await runNeedleSweep(loaded.model as AccuracyModel, loaded.tokenizer!, stream, opts);
    const layout = loaded.model.config;
    for (const c of s.cells) {
      const T = needlePrompt(loaded.tokenizer!, { length: c.length, depth: c.depth, key: 'colex', value: '0000000' }).contextTokens;
      expect(c.ratio).toBeCloseTo(denseCacheBytes(layout, T) / denseCacheBytes(layout, 16), 12);
    }
    expect(tf.memory().numTensors).toBe(start);
  });

  it('kvpack bench needle writes the table, the JSON and the SVG heatmaps', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvpack-needle-'));
    const strategy = join(dir, 'snap.yaml');
    writeFileSync(strategy, 'name: snapkv\nlabel: snapkv-16\noptions: { budget: 16, window: 4 }\n');
    const io = capture();
    const code = await runCli(['bench', 'needle', '--strategy', strategy, '--lengths', '128,144', '--depths', '0,1', '--digits', '2', '--out', dir, '--backend', 'wasm'], io);
    expect(code, io.stderr).toBe(0);
    expect(io.stdout).toMatch(/^\| depth +\| +128 tokens \| +144 tokens \|$/m);
    expect(io.stdout).toMatch(/^\| 100% +\| /m);
    const json = JSON.parse(readFileSync(join(dir, 'needle-snapkv-16.json'), 'utf8'));
    expect(json).toMatchObject({ format: 'kvpack-needle/1', setting: 'snapkv-16', queryMode: 'agnostic', samples: 1, strategy: { name: 'snapkv' } });
    expect(json.cells).toHaveLength(4);
    for (const f of ['needle-snapkv-16.svg', 'needle-snapkv-16-agreement.svg']) {
      const svg = readFileSync(join(dir, f), 'utf8');
      expect(svg.startsWith('<svg')).toBe(true);
      expect(svg).toContain('needle depth');
      expect(svg).toContain('context length (tokens)');
    }
    const bad = capture();
    expect(await runCli(['bench', 'needle', '--lengths', '48,x', '--out', dir], bad)).toBe(2);
    expect(bad.stderr).toMatch(/--lengths takes comma-separated numbers, got "48,x"/);
  });
});
