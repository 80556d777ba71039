import './chained.js';
import * as tf from '@tensorflow/tfjs-core';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { KvpackError } from './errors.js';

/** Backend names kvpack knows, best first. */
export type BackendName = 'tensorflow' | 'webgpu' | 'wasm' | 'cpu';

/**
 * A backend kvpack can try. `load` imports and registers it with tfjs and resolves to nothing, or
 * throws with a one-line reason why it is unavailable. Higher priority is tried first by `auto`
 * (the same idea as tfjs's `registerBackend(name, factory, priority)`).
 */
export interface BackendCandidate {
  name: string;
  priority: number;
  /** `explicit`: the backend was asked for by name (not by `auto`). */
  load(opts?: { explicit: boolean }): Promise<void>;
}

const candidates = new Map<string, BackendCandidate>();

/** True under Node (false in a browser page or worker, where Dawn and tfjs-node do not exist). */
const isNode = typeof process !== 'undefined' && typeof process.versions?.node === 'string';

/** Adds (or replaces) a candidate backend for {@link selectBackend}. */
export function registerBackendCandidate(c: BackendCandidate): void {
  candidates.set(c.name, c);
}

// A `require` for optional native addons (Dawn), from this module's own location: import.meta.url in
// the ESM build; in a CommonJS bundle (the GPU host's esbuild bundle) import.meta is empty and
// __filename names the bundle. (A bare `require` check does not work: bundlers replace it with a shim
// that throws in ESM output.)
declare const __filename: string;
const metaUrl = (import.meta as { url?: string }).url;
const req: NodeRequire = createRequire(typeof metaUrl === 'string' && metaUrl !== '' ? metaUrl : __filename);

async function optionalImport(name: string): Promise<unknown> {
  try {
    return await import(/* @vite-ignore */ name);
  } catch (e) {
    const msg = (e as Error).message.split('\n')[0];
    throw new Error(/Cannot find (package|module)/.test(msg) ? `${name} is not installed` : `${name} failed to load: ${msg}`);
  }
}

registerBackendCandidate({
  name: 'tensorflow',
  priority: 4,
  async load() {
    if (!isNode) throw new Error('tfjs-node runs only under Node, not in a browser');
    const reasons: string[] = [];
    for (const pkg of ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node']) {
      try {
        await optionalImport(pkg);
        if (tf.findBackendFactory('tensorflow')) return;
        reasons.push(`${pkg} loaded but registered no "tensorflow" backend (a second copy of tfjs-core?)`);
      } catch (e) {
        reasons.push((e as Error).message);
      }
    }
    throw new Error(reasons.join('; '));
  },
});

/**
 * Dawn's Node addon: from the file named by KVPACK_DAWN_NODE (bundles), else the `webgpu` package.
 */
function loadDawn(): { create(flags: string[]): unknown; globals: Record<string, unknown> } {
  const path = process.env.KVPACK_DAWN_NODE;
  if (path) return req(path);
  try {
    return req('webgpu');
  } catch {
    throw new Error('the "webgpu" package (Dawn) is not installed and KVPACK_DAWN_NODE is unset');
  }
}

/**
 * The description of a WebGPU adapter (a GPUAdapter) when it is a software (CPU) implementation —
 * Mesa's lavapipe/llvmpipe, SwiftShader, or any adapter flagged `isFallbackAdapter` — else null.
 */
export function softwareAdapter(adapter: unknown): string | null {
  const a = adapter as { isFallbackAdapter?: boolean; info?: { vendor?: string; architecture?: string; device?: string; description?: string } };
  const i = a.info ?? {};
  const fields = [i.description, i.device, i.architecture, i.vendor].filter((x): x is string => !!x);
  const soft = a.isFallbackAdapter || fields.some((x) => /llvmpipe|lavapipe|swiftshader|software/i.test(x));
  return soft ? (fields[0] ?? 'fallback adapter') : null;
}

/**
 * Asks a child Node process for the WebGPU adapter Dawn would give, and returns its description when
 * it is a software adapter (see {@link softwareAdapter}), else null. The child's stderr (Dawn's native
 * warnings) is dropped unless env KVPACK_VERBOSE is set. Any failure of the probe returns null: the
 * in-process load then reports it.
 */
function probeSoftwareAdapter(): string | null {
  let dawnPath: string;
  try {
    dawnPath = process.env.KVPACK_DAWN_NODE || req.resolve('webgpu');
  } catch {
    throw new Error('the "webgpu" package (Dawn) is not installed and KVPACK_DAWN_NODE is unset');
  }
  const probe = `const d = require(${JSON.stringify(dawnPath)}); Object.assign(globalThis, d.globals);
d.create([]).requestAdapter().then((a) => {
  const i = (a && a.info) || {};
  process.stdout.write(JSON.stringify(a ? { isFallbackAdapter: !!a.isFallbackAdapter, info: { vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description } } : null));
  process.exit(0);
}, () => process.exit(1));`;
  const r = spawnSync(process.execPath, ['-e', probe], {
    encoding: 'utf8',
    timeout: 30_000,
    stdio: ['ignore', 'pipe', process.env.KVPACK_VERBOSE ? 'inherit' : 'ignore'],
  });
  if (r.status !== 0 || !r.stdout) return null;
  try {
    const adapter = JSON.parse(r.stdout) as unknown;
    return adapter ? softwareAdapter(adapter) : null;
  } catch {
    return null;
  }
}

registerBackendCandidate({
  name: 'webgpu',
  priority: 3,
  async load(opts) {
    const g = globalThis as unknown as { navigator?: { gpu?: { requestAdapter(): Promise<unknown> } } };
    if (!g.navigator?.gpu && !isNode) throw new Error('this browser has no WebGPU (navigator.gpu is absent)');
    if (!g.navigator?.gpu && !opts?.explicit) {
      // `auto` passes over software adapters; ask a child process, so that Dawn's adapter warnings
      // (printed natively on stderr, e.g. lavapipe's "maxDynamic…BuffersPerPipelineLayout artificially
      // reduced") stay out of this process's output unless KVPACK_VERBOSE is set.
      const soft = probeSoftwareAdapter();
      if (soft) throw new Error(`only a software (CPU) WebGPU adapter: ${soft}; ask for --backend webgpu to use it`);
    }
    if (!g.navigator?.gpu) {
      const dawn = loadDawn();
      Object.assign(globalThis, dawn.globals);
      const gpu = dawn.create([]) as { requestAdapter(): Promise<unknown> };
      try {
        Object.defineProperty(globalThis, 'navigator', { value: { gpu }, configurable: true, writable: true });
      } catch {
        (g as { navigator: unknown }).navigator = { gpu };
      }
    }
    const adapter = await g.navigator!.gpu!.requestAdapter();
    if (!adapter) throw new Error(!isNode ? 'navigator.gpu gave no adapter' : 'Dawn found no GPU adapter (no Vulkan driver?)');
    // A software Vulkan driver (Mesa's lavapipe, SwiftShader) runs WebGPU on the CPU, far slower than
    // wasm: `auto` passes over it; asking for webgpu by name still uses it (tests of the WGSL kernels).
    const soft = softwareAdapter(adapter);
    if (soft && !opts?.explicit) throw new Error(`only a software (CPU) WebGPU adapter: ${soft}; ask for --backend webgpu to use it`);
    // The webgpu backend registers itself on import only when navigator.gpu already exists.
    try {
      await import('@tensorflow/tfjs-backend-webgpu'); // a literal specifier, so bundlers include it
    } catch (e) {
      throw new Error(`@tensorflow/tfjs-backend-webgpu failed to load: ${(e as Error).message.split('\n')[0]}`);
    }
    if (!tf.findBackendFactory('webgpu')) throw new Error('@tensorflow/tfjs-backend-webgpu registered no backend');
  },
});

registerBackendCandidate({
  name: 'wasm',
  priority: 2,
  async load() {
    await import('@tensorflow/tfjs-backend-wasm');
  },
});

registerBackendCandidate({
  name: 'cpu',
  priority: 1,
  async load() {
    await import('@tensorflow/tfjs-backend-cpu');
  },
});

type ErrorEvent = 'uncaughtException' | 'unhandledRejection';
const ERROR_EVENTS: ErrorEvent[] = ['uncaughtException', 'unhandledRejection'];

/** Node's process where there is one (not in a browser page). */
const nodeProcess: NodeJS.Process | undefined =
  typeof process !== 'undefined' && typeof process.listeners === 'function' ? process : undefined;

function processErrorListeners(): Map<ErrorEvent, Set<Function>> {
  return new Map(ERROR_EVENTS.map((ev) => [ev, new Set<Function>(nodeProcess?.listeners(ev as 'uncaughtException') ?? [])]));
}

/**
 * Removes the process-wide error listeners that loading a backend added. Emscripten modules
 * (tfjs-backend-wasm) install an `uncaughtException` handler that rethrows, so that any later
 * uncaught error — the application's own included — prints the 38 KB minified module source line
 * and exits with code 7. kvpack leaves the process's error handling to the application.
 */
function removeAddedErrorListeners(before: Map<ErrorEvent, Set<Function>>): void {
  if (!nodeProcess) return;
  for (const ev of ERROR_EVENTS)
    for (const l of nodeProcess.listeners(ev as 'uncaughtException')) if (!before.get(ev)!.has(l)) nodeProcess.removeListener(ev, l as (...a: unknown[]) => void);
}

/** Names of the registered backend candidates, best (highest priority) first. */
export function backendCandidateNames(): string[] {
  return [...candidates.values()].sort((a, b) => b.priority - a.priority).map((c) => c.name);
}

/** What {@link selectBackend} chose and why it skipped the others. */
export interface BackendChoice {
  name: string;
  skipped: { name: string; reason: string }[];
}

let current: BackendChoice | null = null;

/**
 * Selects the tfjs backend. `auto` (default, or env KVPACK_BACKEND) tries tensorflow
 * (tfjs-node-gpu, then tfjs-node), webgpu, wasm, cpu in priority order and keeps the first that
 * loads and initializes; each skipped one gets a one-line reason.
 * @throws KvpackError('unsupported') when a named backend (or every backend) fails.
 */
export async function selectBackend(preference: string = (typeof process !== 'undefined' && process.env?.KVPACK_BACKEND) || 'auto'): Promise<BackendChoice> {
  if (current && (preference === 'auto' || preference === current.name) && tf.getBackend() === current.name) return current;
  const order = [...candidates.values()].sort((a, b) => b.priority - a.priority);
  const tryList = preference === 'auto' ? order : order.filter((c) => c.name === preference);
  if (tryList.length === 0)
    throw new KvpackError('unsupported', `unknown backend "${preference}"; choose auto or one of ${order.map((c) => c.name).join(', ')}`);
  const skipped: { name: string; reason: string }[] = [];
  for (const c of tryList) {
    const before = processErrorListeners();
    try {
      await c.load({ explicit: preference !== 'auto' });
      const ok = await tf.setBackend(c.name);
      if (!ok) throw new Error(`tf.setBackend("${c.name}") failed to initialize`);
      await tf.ready();
      current = { name: c.name, skipped };
      return current;
    } catch (e) {
      skipped.push({ name: c.name, reason: (e as Error).message.split('\n')[0] });
    } finally {
      removeAddedErrorListeners(before);
    }
  }
  throw new KvpackError('unsupported', `no tfjs backend could be started: ${skipped.map((s) => `${s.name}: ${s.reason}`).join('; ')}`);
}

/** One line describing a backend choice, e.g. `backend wasm (skipped tensorflow: … ; webgpu: …)`. */
export function describeBackend(choice: BackendChoice): string {
  const s = choice.skipped.map((x) => `${x.name}: ${x.reason}`).join('; ');
  return `backend ${choice.name}${s ? ` (skipped ${s})` : ''}`;
}

/**
 * True on the backends whose kernels run synchronously on the host CPU (`wasm`, `cpu`): there a
 * readback is a copy, transposed or batched products are slow, and host float64 code is as fast as
 * the backend for small matrices. Code that picks between a host and a device formulation asks this.
 */
export function isHostBackend(): boolean {
  const be = tf.getBackend();
  return be === 'wasm' || be === 'cpu';
}
