import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { KvpackError } from '@kvpack/core';
import { z } from 'zod';
import type { BenchReport } from './report.js';
import type { SettingResult } from './runner.js';

/**
 * How much worse a quality metric may get before the check fails.
 * - `relError`: relative increase of the key / value reconstruction error (0.05 = +5 %).
 * - `deltaNll`: absolute increase of ΔNLL, nats/token.
 * - `agreement`: absolute decrease of the greedy and of the top-1 agreement fractions.
 * Byte sizes (and so compression ratios) must match exactly.
 */
export interface Tolerance {
  relError: number;
  deltaNll: number;
  agreement: number;
}

export const DEFAULT_TOLERANCE: Tolerance = { relError: 0.05, deltaNll: 0.02, agreement: 0.05 };

/** The metrics a baseline keeps per setting. */
export interface BaselineEntry {
  key: string;
  label: string;
  bytes: number;
  denseBytes: number;
  ratio: number;
  keyError: number | null;
  valueError: number | null;
  nll: number;
  nllReference: number;
  deltaNll: number;
  top1Agreement: number;
  agreement: number | null;
}

/** A committed baseline: the quality metrics of each setting at fixed settings. */
export interface Baseline {
  format: 'kvpack-bench-baseline/1';
  /** Config file the baseline came from (informational). */
  config: string;
  environment: { backend: string; node: string; date: string };
  results: BaselineEntry[];
}

const nullableNum = z.number().nullable();
const BaselineSchema = z.object({
  format: z.literal('kvpack-bench-baseline/1'),
  config: z.string(),
  environment: z.object({ backend: z.string(), node: z.string(), date: z.string() }),
  results: z.array(
    z.object({
      key: z.string(),
      label: z.string(),
      bytes: z.number(),
      denseBytes: z.number(),
      ratio: z.number(),
      keyError: nullableNum,
      valueError: nullableNum,
      nll: z.number(),
      nllReference: z.number(),
      deltaNll: z.number(),
      top1Agreement: z.number(),
      agreement: nullableNum,
    }),
  ),
});

/** Reduces a report to its baseline. */
export function toBaseline(report: Pick<BenchReport, 'config' | 'environment' | 'results'>, configLabel = report.config.source): Baseline {
  return {
    format: 'kvpack-bench-baseline/1',
    config: configLabel,
    environment: { backend: report.environment.backend, node: report.environment.node, date: report.environment.date },
    results: report.results.filter((r) => r.error === undefined).map((r) => ({
      key: r.key,
      label: r.label,
      bytes: r.bytes,
      denseBytes: r.denseBytes,
      ratio: r.ratio,
      keyError: r.keyError,
      valueError: r.valueError,
      nll: r.nll,
      nllReference: r.nllReference,
      deltaNll: r.deltaNll,
      top1Agreement: r.top1Agreement,
      agreement: r.agreement,
    })),
  };
}

/** Reads a baseline file. @throws KvpackError('io' | 'corrupt') naming the file. */
export function readBaseline(path: string): Baseline {
  const abs = resolve(path);
  if (!existsSync(abs)) throw new KvpackError('io', `baseline ${abs} does not exist (create it with --write-baseline)`);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(abs, 'utf8'));
  } catch (e) {
    throw new KvpackError('corrupt', `baseline ${abs} is not valid JSON: ${(e as Error).message}`);
  }
  const r = BaselineSchema.safeParse(raw);
  if (!r.success) throw new KvpackError('corrupt', `baseline ${abs} is not a kvpack bench baseline: ${z.prettifyError(r.error).split('\n').slice(0, 3).join('; ')}`);
  return r.data as Baseline;
}

/** Writes a baseline file (pretty JSON), creating its folder. */
export function writeBaseline(path: string, baseline: Baseline): string {
  const abs = resolve(path);
  mkdirSync(dirname(abs), { recursive: true });
  writeFileSync(abs, `${JSON.stringify(baseline, null, 2)}\n`);
  return abs;
}

/** One failed check. */
export interface Regression {
  label: string;
  metric: 'bytes' | 'keyError' | 'valueError' | 'deltaNll' | 'top1Agreement' | 'agreement' | 'missing';
  baseline: number | null;
  current: number | null;
  /** The worst value the tolerance allows (null for exact / missing checks). */
  limit: number | null;
  message: string;
}

/** Outcome of {@link compareToBaseline}. */
export interface Comparison {
  regressions: Regression[];
  /** Settings checked (present in both). */
  checked: number;
  /** Settings in the current run that the baseline lacks (not failures). */
  added: string[];
  /** Non-failing remarks (e.g. the uncompressed reference NLL moved: a model or backend change). */
  notes: string[];
}

const f = (x: number | null) => (x === null ? 'N/A' : Math.abs(x) >= 1e-3 || x === 0 ? x.toFixed(4) : x.toExponential(3));

/**
 * Compares a run's quality metrics with a baseline, setting by setting (matched by strategy name
 * and options). Fails when: the byte size (so the compression ratio) differs at all; the key or value
 * error exceeds baseline × (1 + relError); ΔNLL exceeds baseline + deltaNll; the greedy or top-1
 * agreement falls below baseline − agreement; an error turns N/A or back; or a baseline setting is missing.
 */
export function compareToBaseline(
  current: (Pick<SettingResult, keyof BaselineEntry> & { error?: string })[],
  baseline: Baseline,
  tol: Tolerance = DEFAULT_TOLERANCE,
): Comparison {
  const regressions: Regression[] = [];
  const notes: string[] = [];
  const byKey = new Map(current.filter((r) => r.error === undefined).map((r) => [r.key, r]));
  const failed = new Map(current.filter((r) => r.error !== undefined).map((r) => [r.key, r.error]));
  const baseKeys = new Set(baseline.results.map((b) => b.key));
  let checked = 0;
  for (const b of baseline.results) {
    const c = byKey.get(b.key);
    if (!c) {
      const why = failed.has(b.key) ? `failed in this run: ${failed.get(b.key)}` : 'in the baseline but not in this run';
      regressions.push({ label: b.label, metric: 'missing', baseline: null, current: null, limit: null, message: `${b.label}: ${why}` });
      continue;
    }
    checked++;
    const push = (metric: Regression['metric'], bv: number | null, cv: number | null, limit: number | null, what: string) =>
      regressions.push({ label: c.label, metric, baseline: bv, current: cv, limit, message: `${c.label}: ${what}` });
    if (c.bytes !== b.bytes || c.denseBytes !== b.denseBytes)
      push('bytes', b.bytes, c.bytes, null, `bytes ${c.bytes} (ratio ${c.ratio.toFixed(4)}×) differ from the baseline's ${b.bytes} (ratio ${b.ratio.toFixed(4)}×); byte sizes are deterministic and must match exactly`);
    for (const m of ['keyError', 'valueError'] as const) {
      const bv = b[m];
      const cv = c[m];
      if (bv === null && cv === null) continue;
      if (bv === null || cv === null) {
        push(m, bv, cv, null, `${m} is ${f(cv)}, baseline ${f(bv)}`);
        continue;
      }
      const limit = bv * (1 + tol.relError) + 1e-9;
      if (!(cv <= limit)) push(m, bv, cv, limit, `${m} ${f(cv)} > baseline ${f(bv)} × (1 + ${tol.relError}) = ${f(limit)}`);
    }
    const nllLimit = b.deltaNll + tol.deltaNll;
    if (!(c.deltaNll <= nllLimit)) push('deltaNll', b.deltaNll, c.deltaNll, nllLimit, `ΔNLL ${f(c.deltaNll)} > baseline ${f(b.deltaNll)} + ${tol.deltaNll} = ${f(nllLimit)}`);
    const t1Limit = b.top1Agreement - tol.agreement;
    if (!(c.top1Agreement >= t1Limit - 1e-12))
      push('top1Agreement', b.top1Agreement, c.top1Agreement, t1Limit, `top-1 agreement ${f(c.top1Agreement)} < baseline ${f(b.top1Agreement)} − ${tol.agreement} = ${f(t1Limit)}`);
    if (b.agreement !== null) {
      const agLimit = b.agreement - tol.agreement;
      if (c.agreement === null || !(c.agreement >= agLimit - 1e-12))
        push('agreement', b.agreement, c.agreement, agLimit, `greedy agreement ${f(c.agreement)} < baseline ${f(b.agreement)} − ${tol.agreement} = ${f(agLimit)}`);
    }
    if (Math.abs(c.nllReference - b.nllReference) > 1e-3 && !notes.some((n) => n.startsWith('uncompressed')))
      notes.push(`uncompressed reference NLL ${c.nllReference.toFixed(4)} differs from the baseline's ${b.nllReference.toFixed(4)} (model, prompt or backend changed?)`);
  }
  const added = current.filter((r) => !baseKeys.has(r.key) && r.error === undefined).map((r) => r.label);
  return { regressions, checked, added, notes };
}

/**
 * Parses `--tolerance`: comma-separated `name=value` pairs over relError, deltaNll, agreement
 * (e.g. `relError=0.05,deltaNll=0.02,agreement=0.05`); unnamed ones keep their defaults.
 * @throws KvpackError('config') on unknown names or bad numbers.
 */
export function parseTolerance(text: string | undefined, base: Tolerance = DEFAULT_TOLERANCE): Tolerance {
  const out = { ...base };
  if (!text) return out;
  for (const part of text.split(',').map((s) => s.trim()).filter(Boolean)) {
    const m = /^([A-Za-z]+)\s*=\s*(.+)$/.exec(part);
    if (!m) throw new KvpackError('config', `--tolerance: "${part}" is not name=value (names: ${Object.keys(DEFAULT_TOLERANCE).join(', ')})`);
    const [, name, value] = m;
    if (!(name in out)) throw new KvpackError('config', `--tolerance: unknown name "${name}" (names: ${Object.keys(DEFAULT_TOLERANCE).join(', ')})`);
    const v = Number(value);
    if (!Number.isFinite(v) || v < 0) throw new KvpackError('config', `--tolerance: ${name} must be a non-negative number, got "${value}"`);
    out[name as keyof Tolerance] = v;
  }
  return out;
}
