/**
 * kvpack in a page: load a model (the embedded stories260K, dropped files or a URL), prefill a prompt,
 * compress its KV cache with a strategy written in YAML/JSON, stream greedy tokens over the compressed
 * cache next to the dense one, show what each really costs, and save / restore the compressed cache
 * in the browser (IndexedDB or OPFS) to continue after a reload without prefilling again.
 *
 *   pnpm --filter @kvpack/examples web:dev      (or web:build, then serve examples/web/dist)
 *
 * Query parameters: `backend` (auto, webgpu, wasm, cpu; default auto), `tokens` (default 24).
 */
import * as tf from '@tensorflow/tfjs-core';
import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import wasmPlain from '@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm?url';
import wasmSimd from '@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm?url';
import wasmThreaded from '@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm?url';
import { KvpackError, createStrategy, describeBackend, parseConfigText, selectBackend, type StrategyConfig } from '@kvpack/core';
import { registerXkv } from '@kvpack/xkv';
import { registerBaselines } from '@kvpack/baselines';
import {
  LlamaModel,
  Session,
  decodeSessionFile,
  disposeLlamaWeights,
  encodeSessionFile,
  loadModelFromBytes,
  loadModelFromUrl,
  type LoadedModel,
  type ModelFiles,
  type SessionFileHeader,
  type Tokenizer,
} from '@kvpack/models';
import embeddedModelUrl from '../../models/stories260K/stories260K_q80.bin?url';
import embeddedTokenizerUrl from '../../models/stories260K/tok512.bin?url';
import { loadSaved, saveSession, type SavedMeta, type StorageKind } from './storage.js';
import { drawPlot } from './plot.js';

registerXkv();
registerBaselines();

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const params = new URLSearchParams(location.search);

/** Strategy presets for the text box (stories260K: 5 layers, 4 KV heads, head_dim 8). */
const PRESETS: Record<string, StrategyConfig> = {
  'xkv (groups of 2 layers, ranks 4/6)': { name: 'xkv', options: { layersPerGroup: 2, rankK: 4, rankV: 6 } },
  'xkv + int4 factors': { name: 'xkv', options: { layersPerGroup: 4, rankK: 8, rankV: 12, factorQuantization: { bits: 4, quantGroupSize: 8 } } },
  'svd (per layer)': { name: 'svd', options: { rankK: 8, rankV: 12 } },
  'kivi 2-bit': { name: 'kivi', options: { bits: 2, quantGroupSize: 8, residualLength: 32 } },
  'quant int4': { name: 'quant', options: { bits: 4 } },
  minicache: { name: 'minicache', options: { startLayer: 3 } },
  streamingllm: { name: 'streamingllm', options: { sinks: 4, budget: 32 } },
  snapkv: { name: 'snapkv', options: { budget: 32, window: 16 } },
};
const DENSE: StrategyConfig = { name: 'dense', options: { storage: 'float32' } };
const PROMPT =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog, Max. ' +
  'One sunny day, Lily and Max went to the park to play with a big red ball.';

/** One generation's measurements. */
interface RunResult {
  strategy: string;
  ids: number[];
  text: string;
  /** Bytes of the compressed prompt cache (its own accounting, `byteSize()`), right after compression. */
  bytes: number;
  /** Bytes of the cache after generation (decoded tokens appended). */
  bytesAfter: number;
  /** Bytes of tensors resident on the backend for the cache right after compression (tf.memory()). */
  resident: number;
  compressMs: number;
  /** Decode steps per second (the first token comes from the prefill's logits). */
  decodeTokensPerS: number;
  /** Milliseconds of each decode step. */
  stepMs: number[];
}

/** What the page did, for readers of the page (its tests among them). */
const data: {
  backend?: string;
  backendReason?: string;
  wasm?: { simd: boolean; threads: boolean; crossOriginIsolated: boolean };
  model?: string;
  promptIds?: number[];
  runs: Record<string, RunResult>;
  continued: number[][];
  saved?: { bytes: number; storage: StorageKind; tokens: number };
  restored?: { position: number; storage: StorageKind };
} = { runs: {}, continued: [] };

let model: LlamaModel | undefined;
let tokenizer: Tokenizer | undefined;
let modelName = '';
/** The model line of the page while no other load is under way. */
let modelStatus = '';

/** Runs a model load, showing its progress; a failed load leaves the current model (and its line) in place. */
async function loading(what: string, fn: () => Promise<void>): Promise<void> {
  $('model-status').textContent = what;
  try {
    await fn();
  } finally {
    $('model-status').textContent = modelStatus;
  }
}
let session: Session | undefined;
let sessionIds: number[] = [];
let busy = false;

function publish(state?: string): void {
  $('run-data').textContent = JSON.stringify(data);
  if (state) document.body.dataset.state = state;
}

function message(e: unknown): string {
  if (e instanceof KvpackError) return `${e.message} [${e.code}]`;
  return e instanceof Error ? e.message : String(e);
}

function showError(e: unknown, where?: HTMLElement): void {
  console.error(e);
  const box = where ?? $('error');
  box.textContent = message(e);
  box.hidden = false;
  publish('error');
}

function clearErrors(): void {
  $('error').hidden = true;
  $('strategy-error').hidden = true;
}

function updateButtons(): void {
  const ready = !!model && !busy;
  ($('run') as HTMLButtonElement).disabled = !ready;
  ($('continue') as HTMLButtonElement).disabled = !ready || !session;
  ($('save') as HTMLButtonElement).disabled = !ready || !session;
  ($('restore') as HTMLButtonElement).disabled = !ready;
}

/** Runs one user action: one at a time, errors shown in the page. */
async function action(fn: () => Promise<void>, errorBox?: () => HTMLElement | undefined): Promise<void> {
  if (busy) return;
  busy = true;
  updateButtons();
  clearErrors();
  publish('running');
  try {
    await fn();
    publish('done');
  } catch (e) {
    const box = errorBox?.();
    if (box) showError(e, box);
    showError(e);
  } finally {
    busy = false;
    updateButtons();
  }
}

// --- backend: webgpu where navigator.gpu gives an adapter, else wasm (SIMD, threads when cross-origin isolated), else cpu ---
async function startBackend(): Promise<void> {
  setWasmPaths({ 'tfjs-backend-wasm.wasm': wasmPlain, 'tfjs-backend-wasm-simd.wasm': wasmSimd, 'tfjs-backend-wasm-threaded-simd.wasm': wasmThreaded });
  const choice = await selectBackend(params.get('backend') ?? 'auto');
  data.backend = choice.name;
  let line = describeBackend(choice);
  if (choice.name === 'wasm') {
    const simd = (await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT')) as boolean;
    const threads = (await tf.env().getAsync('WASM_HAS_MULTITHREAD_SUPPORT')) as boolean;
    data.wasm = { simd, threads, crossOriginIsolated: globalThis.crossOriginIsolated === true };
    line += `; wasm ${simd ? 'with' : 'without'} SIMD, ${threads ? 'with threads (the page is cross-origin isolated)' : 'single-threaded (threads need a cross-origin isolated page: COOP + COEP headers)'}`;
  }
  data.backendReason = line;
  $('backend').textContent = line;
}

// --- models ---
async function useModel(loaded: LoadedModel, name: string): Promise<void> {
  if (!loaded.tokenizer) {
    disposeLlamaWeights(loaded.weights);
    throw new KvpackError('config', `${name}: no tokenizer came with the model (add tokenizer.json, or the llama2.c tokenizer .bin)`);
  }
  session?.dispose();
  session = undefined;
  model?.dispose();
  model = new LlamaModel(loaded.weights);
  tokenizer = loaded.tokenizer;
  modelName = name;
  data.model = name;
  const c = model.config;
  modelStatus = `${name}: ${loaded.format}, ${c.nLayers} layers, ${c.nKvHeads} KV heads, head_dim ${c.headDim}, vocabulary ${c.vocabSize}`;
}

async function loadEmbedded(): Promise<void> {
  await loading('stories260K (embedded) — loading…', async () => {
    const [m, t] = await Promise.all([fetch(embeddedModelUrl), fetch(embeddedTokenizerUrl)]);
    await useModel(await loadModelFromBytes({ 'stories260K_q80.bin': m, 'tok512.bin': t }), 'stories260K (embedded)');
  });
}

async function loadFiles(files: FileList | File[]): Promise<void> {
  const list = [...files];
  check(list.length > 0, 'no files were dropped');
  const map: ModelFiles = {};
  for (const f of list) map[f.name] = f;
  const names = list.map((f) => f.name).join(', ');
  await loading(`loading ${names}…`, async () => useModel(await loadModelFromBytes(map), names));
}

async function loadUrl(url: string): Promise<void> {
  check(url.trim() !== '', 'enter a model URL');
  await loading(`fetching ${url}…`, async () => {
    const loaded = await loadModelFromUrl(url.trim(), {
      onProgress: (file, bytes, total) => {
        $('model-status').textContent = `fetching ${file}: ${(bytes / 1e6).toFixed(1)}${total ? ` of ${(total / 1e6).toFixed(1)}` : ''} MB`;
      },
    });
    await useModel(loaded, url.trim());
  });
}

function check(cond: unknown, msg: string): asserts cond {
  if (!cond) throw new KvpackError('config', msg);
}

// --- strategy text ---
/** The strategy config in the text box, validated with the CLI's schemas. @throws KvpackError('config' | 'unknown-strategy') */
function strategyConfig(): StrategyConfig {
  const text = ($('strategy') as HTMLTextAreaElement).value;
  const raw = parseConfigText(text, 'yaml', 'the strategy text');
  createStrategy(raw as StrategyConfig); // the same schemas as `kvpack`; throws naming the bad option
  return raw as StrategyConfig;
}

function validateStrategy(): void {
  try {
    strategyConfig();
    $('strategy-error').hidden = true;
  } catch (e) {
    const box = $('strategy-error');
    box.textContent = message(e);
    box.hidden = false;
  }
}

// --- generation ---
const tick = () => new Promise<void>((r) => setTimeout(r, 0));

async function generate(
  s: Session,
  maxTokens: number,
  out: HTMLElement,
  context: number[],
): Promise<{ ids: number[]; stepMs: number[] }> {
  const ids: number[] = [];
  const stepMs: number[] = [];
  const gen = s.generate({ maxTokens, sampling: 'greedy' });
  for (;;) {
    const t0 = performance.now();
    const r = await gen.next();
    if (r.done) break;
    stepMs.push(performance.now() - t0);
    ids.push(r.value);
    out.textContent = tokenizer!.decode([...context, ...ids]);
    await tick(); // let the page paint the streamed token (outside the timed step)
  }
  return { ids, stepMs };
}

async function runOne(label: 'dense' | 'strategy', cfg: StrategyConfig, promptIds: number[], maxTokens: number): Promise<Session> {
  const out = $(`output-${label}`);
  out.textContent = '';
  const before = tf.memory().numBytes;
  const s = await Session.start(model!, { strategy: cfg });
  try {
    await s.prefill(promptIds);
    const t0 = performance.now();
    const c = await s.compress();
    const compressMs = performance.now() - t0;
    const resident = tf.memory().numBytes - before;
    const bytes = c.byteSize();
    const { ids, stepMs } = await generate(s, maxTokens, out, promptIds);
    const decodeMs = stepMs.slice(1).reduce((a, b) => a + b, 0);
    data.runs[label] = {
      strategy: c.strategy,
      ids,
      text: tokenizer!.decode(ids),
      bytes,
      bytesAfter: c.byteSize(),
      resident,
      compressMs,
      decodeTokensPerS: decodeMs > 0 ? ((ids.length - 1) * 1000) / decodeMs : 0,
      stepMs,
    };
    return s;
  } catch (e) {
    s.dispose();
    throw e;
  }
}

function showMetrics(): void {
  const body = $('metrics').querySelector('tbody')!;
  body.textContent = '';
  const dense = data.runs.dense;
  for (const [label, r] of Object.entries(data.runs)) {
    const tr = document.createElement('tr');
    tr.dataset.run = label;
    const cells = [
      `${label === 'strategy' ? r.strategy : 'dense'}`,
      r.bytes.toLocaleString('en'),
      r.resident.toLocaleString('en'),
      dense ? `${(dense.bytes / r.bytes).toFixed(2)}×` : '',
      r.compressMs.toFixed(1),
      r.decodeTokensPerS.toFixed(1),
    ];
    for (const c of cells) {
      const td = document.createElement('td');
      td.textContent = c;
      tr.append(td);
    }
    body.append(tr);
  }
  drawPlot($('plot') as HTMLCanvasElement, Object.entries(data.runs).map(([label, r]) => ({ label: label === 'strategy' ? r.strategy : 'dense', values: r.stepMs.slice(1) })));
}

async function run(): Promise<void> {
  const cfg = strategyConfig();
  const maxTokens = Number(($('max-tokens') as HTMLInputElement).value) || 24;
  const promptIds = tokenizer!.encode(($('prompt') as HTMLTextAreaElement).value, { bos: true });
  data.promptIds = promptIds;
  data.runs = {};
  data.continued = [];
  session?.dispose();
  session = undefined;
  $('strategy-title').textContent = cfg.name;
  (await runOne('dense', DENSE, promptIds, maxTokens)).dispose();
  session = await runOne('strategy', cfg, promptIds, maxTokens);
  sessionIds = [...data.runs.strategy.ids];
  showMetrics();
}

async function continueRun(): Promise<void> {
  check(session, 'generate (or restore a saved cache) first');
  const maxTokens = Number(($('max-tokens') as HTMLInputElement).value) || 24;
  const { ids } = await generate(session, maxTokens, $('output-strategy'), [...(data.promptIds ?? []), ...sessionIds]);
  sessionIds.push(...ids);
  data.continued.push(ids);
}

// --- save / restore (a kvpack session file: the cache as `cache.serialize()` writes it, its token ids and the pending token) ---
async function save(): Promise<void> {
  check(session, 'generate first');
  const c = session.cache;
  check(session.tokens, 'the token ids of this cache are unknown');
  const header: SessionFileHeader = {
    format: 'kvpack-session',
    version: 2,
    tokens: [...session.tokens],
    pending: [...session.pendingTokens],
    strategy: c.strategy,
    ...(c.model ? { model: c.model } : {}),
  };
  const file = encodeSessionFile(header, await c.serializeAsync());
  const kind = ($('storage') as HTMLSelectElement).value as StorageKind;
  const meta: SavedMeta = { model: modelName, promptIds: data.promptIds ?? [], generated: sessionIds, strategy: ($('strategy') as HTMLTextAreaElement).value, savedAt: Date.now() };
  await saveSession(kind, file, meta);
  data.saved = { bytes: file.length, storage: kind, tokens: header.tokens.length };
  $('save-status').textContent = `saved ${file.length.toLocaleString('en')} bytes (${c.strategy} cache of ${header.tokens.length} tokens + 1 pending) in ${kind === 'opfs' ? 'OPFS' : 'IndexedDB'}`;
}

async function restore(): Promise<void> {
  const kind = ($('storage') as HTMLSelectElement).value as StorageKind;
  const saved = await loadSaved(kind);
  check(saved, `nothing saved in ${kind === 'opfs' ? 'OPFS' : 'IndexedDB'} yet`);
  const { header, cache } = decodeSessionFile(saved.file, `the saved session (${kind})`);
  check(header, 'the saved cache has no session header');
  check(saved.meta.model === modelName, `the saved cache was made with ${saved.meta.model}; load that model first (this page has ${modelName})`);
  session?.dispose();
  session = undefined;
  // No prefill: the cache covers the prompt and the generated tokens; only the pending token is fed.
  session = await Session.resume(model!, cache, { tokens: header.tokens, remainingTokens: header.pending });
  data.promptIds = saved.meta.promptIds;
  sessionIds = [...saved.meta.generated];
  ($('strategy') as HTMLTextAreaElement).value = saved.meta.strategy;
  $('output-strategy').textContent = tokenizer!.decode([...saved.meta.promptIds, ...sessionIds]);
  data.restored = { position: session.position, storage: kind };
  $('save-status').textContent = `restored a ${header.strategy} cache of ${header.tokens.length} tokens from ${kind === 'opfs' ? 'OPFS' : 'IndexedDB'}; Continue generates from it without prefilling`;
}

// --- wiring ---
function setUp(): void {
  const preset = $('preset') as HTMLSelectElement;
  for (const name of Object.keys(PRESETS)) preset.append(new Option(name, name));
  const fill = () => {
    ($('strategy') as HTMLTextAreaElement).value = `name: ${PRESETS[preset.value].name}\noptions: ${JSON.stringify(PRESETS[preset.value].options)}\n`;
    validateStrategy();
  };
  preset.addEventListener('change', fill);
  fill();
  ($('prompt') as HTMLTextAreaElement).value = PROMPT;
  const tokens = params.get('tokens');
  if (tokens) ($('max-tokens') as HTMLInputElement).value = tokens;
  $('strategy').addEventListener('input', validateStrategy);
  $('run').addEventListener('click', () => action(run, () => $('strategy-error')));
  $('continue').addEventListener('click', () => action(continueRun));
  $('save').addEventListener('click', () => action(save));
  $('restore').addEventListener('click', () => action(restore));
  $('model-files').addEventListener('change', (ev) => action(() => loadFiles((ev.target as HTMLInputElement).files ?? [])));
  $('url-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    void action(() => loadUrl(($('model-url') as HTMLInputElement).value));
  });
  $('load-embedded').addEventListener('click', () => action(loadEmbedded));
  const drop = $('drop');
  drop.addEventListener('dragover', (ev) => {
    ev.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (ev) => {
    ev.preventDefault();
    drop.classList.remove('over');
    void action(() => loadFiles(ev.dataTransfer?.files ?? []));
  });
  window.addEventListener('error', (ev) => showError(ev.error ?? ev.message));
  window.addEventListener('unhandledrejection', (ev) => showError(ev.reason));
}

setUp();
void action(async () => {
  await startBackend();
  await loadEmbedded();
  publish('ready');
}).then(() => {
  if (document.body.dataset.state === 'done') publish('ready');
});
