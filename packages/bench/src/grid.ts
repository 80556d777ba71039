import { KvpackError } from '@kvpack/core';

/**
 * One strategy entry of a bench config, before expansion. `options` values that are arrays are grid
 * axes (cartesian product); `zip` holds equal-length lists that vary together (one axis). To pass an
 * option whose value is itself an array, wrap it in a one-element list: `layers: [[0, 1, 2]]`.
 */
export interface GridEntry {
  name: string;
  options?: Record<string, unknown>;
  zip?: Record<string, unknown[]>;
  /** Label prefix of the expanded settings (default: the strategy name). */
  label?: string;
  /** Plot series (one line per series). Default: the label prefix. */
  series?: string;
  /** Options whose values split the series, e.g. ['layersPerGroup'] gives one line per group size. */
  seriesBy?: string[];
}

/** One concrete strategy setting: a point of an expanded grid. */
export interface Setting {
  /** Registered strategy name. */
  name: string;
  /** Options exactly as written in the config (before schema defaults). */
  options: Record<string, unknown>;
  /** Human-readable label, e.g. `xkv layersPerGroup=2 rankK=8 rankV=12`. Unique within a config. */
  label: string;
  /** Plot series, e.g. `xkv G=2`. */
  series: string;
  /** Stable identity for baselines: name plus the options as canonical JSON (sorted keys). */
  key: string;
  /** Index of the config entry it came from. */
  entry: number;
}

/** JSON with object keys sorted at every level (stable identity of an options object). */
export function canonicalJson(x: unknown): string {
  if (Array.isArray(x)) return `[${x.map(canonicalJson).join(',')}]`;
  if (x && typeof x === 'object') {
    const o = x as Record<string, unknown>;
    return `{${Object.keys(o)
      .sort()
      .filter((k) => o[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(x);
}

/** Identity of a setting: `name` + canonical options JSON. */
export function settingKey(name: string, options: Record<string, unknown>): string {
  return `${name} ${canonicalJson(options)}`;
}

/** Compact label text of an option value: scalars as is, objects as {k:v,…} without quotes. */
function fmt(v: unknown): string {
  if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (Array.isArray(v)) return `[${v.map(fmt).join(',')}]`;
  if (v && typeof v === 'object') return `{${Object.entries(v).map(([k, x]) => `${k}:${fmt(x)}`).join(',')}}`;
  return String(v);
}

/**
 * Expands one grid entry into settings: the cartesian product of the array-valued `options` (in
 * the order the keys are written, last key fastest) crossed with the rows of `zip`.
 * @throws KvpackError('config') for empty lists, zip lists of unequal length, or a key in both.
 */
export function expandEntry(entry: GridEntry, where = entry.name, entryIndex = 0): Setting[] {
  const axes: { keys: string[]; rows: unknown[][] }[] = [];
  const fixed: Record<string, unknown> = {};
  const varied: string[] = [];
  for (const [k, v] of Object.entries(entry.options ?? {})) {
    if (Array.isArray(v)) {
      if (v.length === 0) throw new KvpackError('config', `${where}: option "${k}" is an empty list (a grid axis needs at least one value)`);
      axes.push({ keys: [k], rows: v.map((x) => [x]) });
      if (v.length > 1) varied.push(k);
    } else fixed[k] = v;
  }
  const zip = entry.zip ?? {};
  const zipKeys = Object.keys(zip);
  if (zipKeys.length > 0) {
    for (const k of zipKeys) {
      if (!Array.isArray(zip[k])) throw new KvpackError('config', `${where}: zip.${k} must be a list`);
      if (entry.options && k in entry.options) throw new KvpackError('config', `${where}: option "${k}" appears in both options and zip`);
    }
    const n = zip[zipKeys[0]].length;
    const bad = zipKeys.find((k) => zip[k].length !== n);
    if (bad !== undefined)
      throw new KvpackError(
        'config',
        `${where}: zip lists must have equal lengths, got ${zipKeys.map((k) => `${k}: ${zip[k].length}`).join(', ')}`,
      );
    if (n === 0) throw new KvpackError('config', `${where}: zip lists are empty`);
    axes.push({ keys: zipKeys, rows: Array.from({ length: n }, (_, i) => zipKeys.map((k) => zip[k][i])) });
    if (n > 1) varied.push(...zipKeys);
  }
  let combos: Record<string, unknown>[] = [{ ...fixed }];
  for (const axis of axes) {
    const next: Record<string, unknown>[] = [];
    for (const c of combos) for (const row of axis.rows) next.push({ ...c, ...Object.fromEntries(axis.keys.map((k, i) => [k, row[i]])) });
    combos = next;
  }
  const prefix = entry.label ?? entry.name;
  for (const k of entry.seriesBy ?? []) {
    if (!(k in (entry.options ?? {})) && !(k in zip)) throw new KvpackError('config', `${where}: seriesBy names "${k}", which is not one of its options`);
  }
  return combos.map((options) => {
    const label = [prefix, ...varied.map((k) => `${k}=${fmt(options[k])}`)].join(' ');
    const seriesBase = entry.series ?? prefix;
    const series = [seriesBase, ...(entry.seriesBy ?? []).map((k) => `${k}=${fmt(options[k])}`)].join(' ');
    return { name: entry.name, options, label, series, key: settingKey(entry.name, options), entry: entryIndex };
  });
}

/**
 * Expands a list of grid entries; checks that no two settings are the same strategy with the same
 * options and makes labels unique (appending the fixed options when two labels collide).
 * @throws KvpackError('config') on duplicate settings.
 */
export function expandGrid(entries: GridEntry[]): Setting[] {
  const out: Setting[] = [];
  entries.forEach((e, i) => out.push(...expandEntry(e, `strategies[${i}] (${e.name})`, i)));
  const seen = new Map<string, string>();
  for (const s of out) {
    const prev = seen.get(s.key);
    if (prev !== undefined) throw new KvpackError('config', `strategy setting "${s.label}" appears twice (same name and options: ${s.key})`);
    seen.set(s.key, s.label);
  }
  const count = new Map<string, number>();
  for (const s of out) count.set(s.label, (count.get(s.label) ?? 0) + 1);
  for (const s of out) {
    if ((count.get(s.label) ?? 0) > 1) {
      const extra = Object.entries(s.options)
        .map(([k, v]) => `${k}=${fmt(v)}`)
        .join(' ');
      s.label = `${s.label} ${extra}`.trim();
    }
  }
  const used = new Set<string>();
  for (const s of out) {
    let l = s.label;
    for (let i = 2; used.has(l); i++) l = `${s.label} #${i}`;
    s.label = l;
    used.add(l);
  }
  return out;
}
