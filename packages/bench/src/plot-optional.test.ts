import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { KvpackError } from '@kvpack/core';
import { writeBenchOutputs } from './commands.js';
import { renderRatioPlot } from './plot.js';

// vega is an optional peer: simulate an install without it.
vi.mock('vega', () => {
  throw new Error("Cannot find package 'vega'");
});

describe('plots without the optional vega peers', () => {
  it('renderRatioPlot names the install command; a bench run still writes its JSON and Markdown', async () => {
    const err = await renderRatioPlot([{ title: 'A', yTitle: 'y', points: [{ ratio: 2, value: 1, series: 's' }] }]).catch((e) => e);
    expect(err).toBeInstanceOf(KvpackError);
    expect(err.code).toBe('unsupported');
    expect(err.message).toMatch(/npm i vega@6 vega-lite@6 \(or pass --no-plot\)/);

    const dir = mkdtempSync(join(tmpdir(), 'kvpack-noplot-'));
    const io = { stdout: '', stderr: '', out: (t: string) => void (io.stdout += `${t}\n`), err: (t: string) => void (io.stderr += `${t}\n`) };
    const written = await writeBenchOutputs(io, { out: dir }, 'run', { ok: true }, '| table |', () =>
      renderRatioPlot([{ title: 'A', yTitle: 'y', points: [{ ratio: 2, value: 1, series: 's' }] }]),
    );
    expect(written.map((p) => p.slice(dir.length + 1))).toEqual(['run.json', 'run.md']);
    expect(existsSync(join(dir, 'run.svg'))).toBe(false);
    expect(io.stderr).toMatch(/note: no SVG plot: .*vega/);
  });
});
