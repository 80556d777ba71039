import { existsSync, writeFileSync } from 'node:fs';
import type { Command } from 'commander';
import { KvpackError } from '@kvpack/core';
import { FileBackend, collectGarbage, inspectStore, openBackend, readNamespace, readStoredCache, redact, resolveKey, type InspectedEntry, type StoreBackend } from '@kvpack/store';
import { EXIT, processIO, type CommandIO } from './commands.js';
import { registerStoreBench } from './store-bench.js';

/** Runs `fn` on the backend a store URL names, closing it after. */
async function withBackend<T>(url: string, fn: (b: StoreBackend) => Promise<T>): Promise<T> {
  const backend = openBackend(url);
  // A mistyped folder is not an empty store.
  if (backend instanceof FileBackend && !existsSync(backend.root)) {
    await backend.close();
    throw new KvpackError('io', `no store at ${backend.root}: the folder does not exist`);
  }
  try {
    return await fn(backend);
  } catch (e) {
    if (e instanceof KvpackError) throw e;
    throw new KvpackError('io', `store ${redact(url)}: ${(e as Error).message}`, { cause: e });
  } finally {
    await backend.close();
  }
}

const iso = (ms?: number) => (ms === undefined ? '-' : new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z'));

/** `kvpack store ls URL`: every namespace (model, strategy, options, chunk size) and its prefixes, checked. */
export async function storeLs(url: string, opts: { namespace?: string; verify?: boolean; json?: boolean }, io: CommandIO = processIO): Promise<number> {
  return withBackend(url, async (backend) => {
    const rows: (InspectedEntry & { descriptor?: unknown })[] = [];
    const spaces = opts.namespace ? [opts.namespace] : await backend.namespaces();
    const lines: string[] = [];
    for (const ns of spaces) {
      const d = await readNamespace(backend, ns);
      lines.push(`namespace ${ns}  ${d ? `model ${d.model}  strategy ${d.strategy} ${JSON.stringify(d.options)}  chunk ${d.chunkTokens} tokens` : '(no descriptor)'}`);
      for await (const e of inspectStore(backend, { namespace: ns, verify: opts.verify ?? true })) {
        rows.push(e);
        lines.push(`  ${e.key}  ${String(e.tokens ?? '?').padStart(6)} tokens  ${String(e.recordBytes ?? '?').padStart(10)} bytes  ${iso(e.created)}  ${e.status}${e.problem ? `: ${e.problem}` : ''}`);
      }
    }
    io.out(opts.json ? JSON.stringify(rows, null, 2) : lines.length ? lines.join('\n') : `(empty store: ${backend.location})`);
    return EXIT.ok;
  });
}

/** Per-namespace totals of a store. */
export interface StoreStatsRow {
  namespace: string;
  model?: string;
  strategy?: string;
  chunkTokens?: number;
  prefixes: number;
  /** Tokens of the usable prefixes, summed. */
  tokens: number;
  /** Bytes of the usable prefixes' records (every header included). */
  bytes: number;
  /** Keys that no lookup can use (expired, corrupt, half-written or evicted): what `gc` removes. */
  unusable: number;
}

/** `kvpack store stats URL`: per-namespace prefix count, tokens, bytes, bytes per token, unusable keys. */
export async function storeStats(url: string, opts: { json?: boolean }, io: CommandIO = processIO): Promise<number> {
  return withBackend(url, async (backend) => {
    const rows: StoreStatsRow[] = [];
    for (const ns of await backend.namespaces()) {
      const d = await readNamespace(backend, ns);
      const row: StoreStatsRow = { namespace: ns, ...(d ? { model: d.model, strategy: d.strategy, chunkTokens: d.chunkTokens } : {}), prefixes: 0, tokens: 0, bytes: 0, unusable: 0 };
      for await (const e of inspectStore(backend, { namespace: ns })) {
        if (e.status === 'link') continue; // a shorter prefix served by cutting a stored record: no bytes of its own
        if (e.status !== 'ok') row.unusable++;
        else {
          row.prefixes++;
          row.tokens += e.tokens ?? 0;
          row.bytes += e.recordBytes ?? 0;
        }
      }
      rows.push(row);
    }
    if (opts.json) io.out(JSON.stringify(rows, null, 2));
    else {
      const lines = ['| namespace | strategy | chunk | prefixes | tokens | bytes | bytes/token | unusable |', '|---|---|--:|--:|--:|--:|--:|--:|'];
      for (const r of rows)
        lines.push(`| ${r.namespace} | ${r.strategy ?? '?'} | ${r.chunkTokens ?? '?'} | ${r.prefixes} | ${r.tokens} | ${r.bytes} | ${r.tokens ? (r.bytes / r.tokens).toFixed(1) : '-'} | ${r.unusable} |`);
      io.out(rows.length ? lines.join('\n') : `(empty store: ${backend.location})`);
    }
    return EXIT.ok;
  });
}

/** `kvpack store get URL KEY [--out FILE]`: the checked serialized cache of one prefix (restorable with deserializeCache). */
export async function storeGet(url: string, key: string, opts: { out?: string }, io: CommandIO = processIO): Promise<number> {
  return withBackend(url, async (backend) => {
    const got = await readStoredCache(backend, key);
    if (opts.out) writeFileSync(opts.out, got.cache);
    io.out(JSON.stringify({ namespace: got.namespace, key: got.key, tokens: got.tokens, cacheBytes: got.cache.length, ...(opts.out ? { written: opts.out } : {}) }));
    return EXIT.ok;
  });
}

/** `kvpack store rm URL KEY…` or `--namespace ID`: removes prefixes (manifest first) or a whole namespace. */
export async function storeRm(url: string, keys: string[], opts: { namespace?: string }, io: CommandIO = processIO): Promise<number> {
  if (!keys.length && !opts.namespace) throw new KvpackError('config', 'store rm: give prefix keys (at least 8 hex digits each) or --namespace ID');
  return withBackend(url, async (backend) => {
    let removed = 0;
    for (const k of keys) {
      const { namespace, key } = await resolveKey(backend, k);
      if (await backend.remove(namespace, key)) removed++;
    }
    if (opts.namespace) {
      const all: string[] = [];
      for await (const e of backend.entries(opts.namespace)) all.push(e.key);
      for (const k of all) if (await backend.remove(opts.namespace, k)) removed++;
      await backend.removeNamespace(opts.namespace);
    }
    io.out(`removed ${removed} prefix${removed === 1 ? '' : 'es'}${opts.namespace ? ` and namespace ${opts.namespace}` : ''}`);
    return EXIT.ok;
  });
}

/** `kvpack store gc URL`: removes expired prefixes, corrupt records, half-written and evicted keys, temporary files. */
export async function storeGc(url: string, opts: { graceMs?: string; dryRun?: boolean }, io: CommandIO = processIO): Promise<number> {
  const grace = opts.graceMs === undefined ? undefined : Number(opts.graceMs);
  if (grace !== undefined && !(Number.isFinite(grace) && grace >= 0)) throw new KvpackError('config', `--grace-ms must be a number of milliseconds ≥ 0, got "${opts.graceMs}"`);
  return withBackend(url, async (backend) => {
    const r = await collectGarbage(backend, { ...(grace !== undefined ? { graceMs: grace } : {}), ...(opts.dryRun ? { dryRun: true } : {}) });
    io.out(
      `${opts.dryRun ? 'would remove' : 'removed'}: ${r.expired} expired, ${r.corrupt} corrupt, ${r.manifestsWithoutRecord} evicted (manifest without record), ` +
        `${r.recordsWithoutManifest} half-written (record without manifest), ${r.temporaryFiles} temporary files; kept ${r.kept}`,
    );
    return EXIT.ok;
  });
}

const URL_HELP = 'store URL: file://PATH (or a path), redis://[user:pass@]HOST:PORT[/DB], rediss://, valkey://, redis+cluster://HOST:PORT[,HOST:PORT…]';

/** Adds `kvpack store ls | stats | get | rm | gc`, and `kvpack bench store` to the `bench` command when there is one. Each action stores its exit code in `state.code`. */
export function registerStoreCommands(program: Command, io: CommandIO, state: { code: number }): void {
  const bench = program.commands.find((c) => c.name() === 'bench');
  if (bench) registerStoreBench(bench, io, state);
  const store = program.command('store').description('inspect and maintain a prefix store of compressed KV caches (file or Redis/Valkey)');
  store
    .command('ls')
    .description('list namespaces (model, strategy, options, chunk size) and their stored prefixes, each checked')
    .argument('<url>', URL_HELP)
    .option('--namespace <id>', 'only this namespace')
    .option('--no-verify', 'do not read the records (faster; statuses from the manifests only)')
    .option('--json', 'JSON output')
    .action(async (url: string, o) => void (state.code = await storeLs(url, o, io)));
  store
    .command('stats')
    .description('per namespace: prefixes, tokens, bytes, bytes per token, unusable keys')
    .argument('<url>', URL_HELP)
    .option('--json', 'JSON output')
    .action(async (url: string, o) => void (state.code = await storeStats(url, o, io)));
  store
    .command('get')
    .description('check one stored prefix and write its serialized cache (restorable with deserializeCache)')
    .argument('<url>', URL_HELP)
    .argument('<key>', 'prefix key, or its first 8+ hex digits')
    .option('--out <file>', 'write the serialized cache here')
    .action(async (url: string, key: string, o) => void (state.code = await storeGet(url, key, o, io)));
  store
    .command('rm')
    .description('remove stored prefixes by key, or a whole namespace')
    .argument('<url>', URL_HELP)
    .argument('[keys...]', 'prefix keys, or their first 8+ hex digits')
    .option('--namespace <id>', 'remove every prefix of this namespace, and the namespace')
    .action(async (url: string, keys: string[], o) => void (state.code = await storeRm(url, keys, o, io)));
  store
    .command('gc')
    .description('remove what no lookup can use: expired, corrupt, evicted and half-written prefixes, temporary files')
    .argument('<url>', URL_HELP)
    .option('--grace-ms <ms>', 'keep records without a manifest younger than this (a write in progress); default 60000')
    .option('--dry-run', 'count, remove nothing')
    .action(async (url: string, o) => void (state.code = await storeGc(url, o, io)));
}
