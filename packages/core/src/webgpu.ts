import * as tf from '@tensorflow/tfjs-core';
import { check } from './errors.js';

/**
 * One WGSL compute shader run through tfjs-backend-webgpu's own program runner
 * (`WebGPUBackend.runWebGPUProgram`), so it shares tfjs's command encoder, buffer pool and pipeline
 * cache and its output is an ordinary tensor (freed by `tf.tidy` / `dispose`).
 *
 * The shader sees each input as a storage array named as in `names` (`array<f32>` for float32,
 * `array<i32>` for int32), the output as `result` (read-write), the input and output shapes as
 * `uniforms.<name>Shape` / `uniforms.outShape` (name with a lower-case first letter; `i32` for rank 1,
 * `vecN<i32>` above), and the private variables `workgroupId`, `localId`, `localIndex`, `numWorkgroups`.
 * `code` must define `fn kernel(index: i32)` (called once per invocation; `index` is a flat
 * invocation index) and may use workgroup variables and barriers. Every input must be read by it: the
 * pipeline layout is derived from the shader, and tfjs binds every input.
 */
export interface WgslKernel {
  /** Unique name of the shader text, including every constant baked into `code`. */
  key: string;
  /** Names of the inputs in the shader, one per tensor. */
  names: string[];
  inputs: tf.Tensor[];
  outputShape: number[];
  dtype: 'float32' | 'int32';
  /** Invocations per workgroup (1-D). */
  workgroupSize: number;
  /** Workgroups in x, y, z (each at most the device's maxComputeWorkgroupsPerDimension, 65,535 by default). */
  dispatch: [number, number, number];
  /** Bytes of the shader's workgroup-address-space arrays (checked against the device limit before dispatch). */
  workgroupBytes: number;
  code: string;
  /**
   * Scalars of this dispatch read as `uniforms.<name>` (written into tfjs's uniform buffer with the
   * shapes: no tensor upload and no new pipeline when a value changes; uniform values also keep
   * barriers in uniform control flow).
   */
  uniforms?: { name: string; type: 'i32' | 'f32'; value: number }[];
  /**
   * Element widths of the storage arrays: `inputs[i]` = 4 declares input i as `array<vec4<f32>>`
   * (`vec4<i32>` for int32) and `output` = 4 the result likewise (one 16-byte load or store per
   * element: memory-bound kernels reach the bandwidth with fewer, wider accesses). The array then has
   * ⌊size/4⌋ elements, so the caller uses width 4 only for sizes divisible by 4; the shape uniforms
   * still count scalars. Default 1 everywhere.
   */
  components?: { inputs?: number[]; output?: number };
}

/** Invocations per workgroup of the flat (1-D) kernels. */
export const FLAT_WORKGROUP = 256;

/**
 * Workgroups for n invocations of 1-D workgroups of `size` (default {@link FLAT_WORKGROUP}), spread over
 * x and y so that each stays within 65,535; the kernel reads its index with {@link wgslFlatIndex}.
 */
export function flatDispatch(n: number, size = FLAT_WORKGROUP): [number, number, number] {
  const groups = Math.max(1, Math.ceil(n / size));
  const x = Math.min(groups, 65535);
  return [x, Math.ceil(groups / x), 1];
}

/** A WGSL statement declaring `name` as the flat invocation index of a {@link flatDispatch} grid. */
export function wgslFlatIndex(name: string, size = FLAT_WORKGROUP): string {
  return `let ${name} = (i32(workgroupId.y) * i32(numWorkgroups.x) + i32(workgroupId.x)) * ${size} + i32(localId.x);`;
}

/**
 * {@link runWgsl} for a flat kernel without workgroup memory: `invocations` 1-D invocations in
 * workgroups of {@link FLAT_WORKGROUP} over a {@link flatDispatch} grid (the kernel reads its index
 * with {@link wgslFlatIndex}).
 * @throws as runWgsl.
 */
export function runFlatWgsl(k: Omit<WgslKernel, 'workgroupSize' | 'dispatch' | 'workgroupBytes'> & { invocations: number }): tf.Tensor {
  const { invocations, ...rest } = k;
  return runWgsl({ ...rest, workgroupSize: FLAT_WORKGROUP, dispatch: flatDispatch(invocations), workgroupBytes: 0 });
}

/** True when the active tfjs backend is webgpu (custom WGSL kernels can run). */
export function isWebGpuBackend(): boolean {
  return tf.getBackend() === 'webgpu';
}

interface GpuErrorScopes {
  limits: { maxComputeWorkgroupStorageSize: number };
  pushErrorScope(filter: 'validation'): void;
  popErrorScope(): Promise<{ message: string } | null>;
}

interface WebGpuRunner {
  device: GpuErrorScopes;
  runWebGPUProgram(program: unknown, inputs: tf.TensorInfo[], dtype: tf.DataType, uniforms?: { type: string; data: number[] }[]): tf.TensorInfo;
}

/** Workgroup memory of the active webgpu device, bytes (16,384 is WebGPU's default; tfjs asks for the adapter's maximum). */
export function wgslWorkgroupStorageLimit(): number {
  check(isWebGpuBackend(), 'unsupported', `the workgroup storage limit needs the webgpu backend, not ${tf.getBackend()}`);
  return (tf.backend() as unknown as WebGpuRunner).device.limits.maxComputeWorkgroupStorageSize;
}

// Dawn reports an invalid shader or bind group only through error scopes (and its log); tfjs then goes
// on with an invalid command buffer and the outputs read as zeros or stale data. The first dispatch of
// each kernel runs inside a validation scope; a failure is remembered, the next call of that kernel
// throws, and wgslValidationErrors() reports it.
const validated = new Set<string>();
const failures = new Map<string, string>();
const pending: Promise<void>[] = [];

/**
 * Waits for the validation of every WGSL kernel dispatched so far and returns the failures, as
 * "key: message" lines (empty when all shaders and bindings were valid).
 */
export async function wgslValidationErrors(): Promise<string[]> {
  await Promise.all(pending.splice(0));
  return [...failures].map(([key, msg]) => `${key}: ${msg}`);
}

/**
 * Dispatches a {@link WgslKernel} on the webgpu backend and returns its output tensor.
 * @throws KvpackError('unsupported') off the webgpu backend, when the kernel needs more workgroup
 * memory than the device allows, or when an earlier dispatch of the same kernel failed WebGPU
 * validation; KvpackError('shape') for an empty output or a dispatch beyond 65,535 workgroups in a
 * dimension.
 */
export function runWgsl(k: WgslKernel): tf.Tensor {
  check(isWebGpuBackend(), 'unsupported', `WGSL kernel ${k.key} needs the webgpu backend, not ${tf.getBackend()}`);
  check(k.names.length === k.inputs.length, 'shape', `WGSL kernel ${k.key}: ${k.names.length} names for ${k.inputs.length} inputs`);
  check(k.outputShape.every((v) => Number.isInteger(v) && v > 0), 'shape', `WGSL kernel ${k.key}: output shape [${k.outputShape}] must be positive`);
  check(k.dispatch.every((v) => Number.isInteger(v) && v > 0 && v <= 65535), 'shape', `WGSL kernel ${k.key}: dispatch [${k.dispatch}] is outside 1 … 65,535`);
  const backend = tf.backend() as unknown as WebGpuRunner;
  const limit = backend.device.limits.maxComputeWorkgroupStorageSize;
  check(k.workgroupBytes <= limit, 'unsupported', `WGSL kernel ${k.key} needs ${k.workgroupBytes} bytes of workgroup memory; this device allows ${limit}`);
  for (const u of k.uniforms ?? []) {
    check(/^[a-z][A-Za-z0-9_]*$/.test(u.name) && !/^(outShape|outShapeStrides|size|.*Shape(Strides)?)$/.test(u.name), 'config', `WGSL kernel ${k.key}: uniform name "${u.name}" must be a lower-case WGSL identifier that is not one of tfjs's (outShape, size, <input>Shape)`);
    check(u.type === 'f32' ? Number.isFinite(u.value) : Number.isInteger(u.value) && u.value >= -(2 ** 31) && u.value < 2 ** 31, 'config', `WGSL kernel ${k.key}: uniform ${u.name} = ${u.value} is not a finite ${u.type === 'f32' ? 'float' : 'int32'}`);
  }
  const widths = k.components?.inputs ?? k.names.map(() => 1);
  const outWidth = k.components?.output ?? 1;
  check(widths.length === k.names.length && [...widths, outWidth].every((w) => w === 1 || w === 4), 'config', `WGSL kernel ${k.key}: element widths must be 1 or 4, one per input, got [${widths}] → ${outWidth}`);
  check(
    k.inputs.every((x, i) => widths[i] === 1 || x.size % 4 === 0) && (outWidth === 1 || k.outputShape.reduce((a, b) => a * b, 1) % 4 === 0),
    'shape',
    `WGSL kernel ${k.key}: an input or output read as vec4 must have a size divisible by 4`,
  );
  const wide = k.components !== undefined && [...widths, outWidth].some((w) => w !== 1);
  const failed = failures.get(k.key);
  check(failed === undefined, 'unsupported', `WGSL kernel ${k.key} failed WebGPU validation: ${failed}`);
  const program = {
    variableNames: k.names,
    outputShape: k.outputShape,
    // tfjs caches pipelines by this key, which does not see the uniform layout: it is part of the key.
    shaderKey: `kvpack_${k.key}${k.uniforms?.length ? `_u_${k.uniforms.map((u) => `${u.name}:${u.type}`).join(',')}` : ''}${wide ? `_w_${widths.join(',')}_${outWidth}` : ''}`,
    // A flat layout: tfjs then calls main(index) and leaves the dispatch as given.
    dispatchLayout: { x: k.outputShape.map((_, i) => i) },
    dispatch: k.dispatch,
    workgroupSize: [k.workgroupSize, 1, 1] as [number, number, number],
    ...(wide ? { variableComponents: widths, outputComponent: outWidth } : {}),
    ...(k.uniforms?.length ? { uniforms: k.uniforms.map((u) => `${u.name} : ${u.type},`).join(' ') } : {}),
    // tfjs always binds its uniform buffer; a pipeline whose shader never reads it has no such binding
    // and Dawn rejects the bind group. The wrapper reads one uniform (NAN, always NaN, so the branch is
    // never taken; uniform data keeps the kernel's barriers in uniform control flow).
    getUserCode: () => `${k.code}\nfn main(index: i32) {\n  if (uniforms.NAN == 1.0) { return; }\n  kernel(index);\n}`,
  };
  const first = !validated.has(k.key);
  if (first) {
    validated.add(k.key);
    backend.device.pushErrorScope('validation');
  }
  let info: tf.TensorInfo;
  try {
    const values = k.uniforms?.map((u) => ({ type: u.type === 'f32' ? 'float32' : 'int32', data: [u.value] }));
    info = backend.runWebGPUProgram(program, k.inputs, k.dtype, values);
  } finally {
    if (first)
      pending.push(
        backend.device.popErrorScope().then((e) => {
          if (e) {
            failures.set(k.key, e.message.split('\n')[0]);
            console.error(`[kvpack] WGSL kernel ${k.key} failed WebGPU validation (its outputs are invalid): ${e.message.split('\n')[0]}`);
          }
        }),
      );
  }
  return tf.engine().makeTensorFromTensorInfo(info);
}

/**
 * Runs `fn` (awaited) and counts the compute programs the webgpu backend dispatches meanwhile (tfjs's
 * own op kernels and {@link runWgsl} kernels alike: each is one `runWebGPUProgram`, one Dawn dispatch),
 * and the readbacks to the host (`read` / `readSync`). Off webgpu both counts are null. For the perf
 * report's "kernels per compress / per decode step"; not reentrant.
 */
export async function countWebGpuDispatches<T>(fn: () => Promise<T> | T): Promise<{ result: T; dispatches: number | null; readbacks: number | null }> {
  if (!isWebGpuBackend()) return { result: await fn(), dispatches: null, readbacks: null };
  const backend = tf.backend() as unknown as Record<'runWebGPUProgram' | 'read' | 'readSync', (...a: unknown[]) => unknown>;
  const names = ['runWebGPUProgram', 'read', 'readSync'] as const;
  const own = names.filter((n) => Object.prototype.hasOwnProperty.call(backend, n));
  const saved = { run: backend.runWebGPUProgram, read: backend.read, readSync: backend.readSync };
  let dispatches = 0;
  let readbacks = 0;
  backend.runWebGPUProgram = function (this: unknown, ...a: unknown[]) {
    dispatches++;
    return saved.run.apply(this, a);
  };
  backend.read = function (this: unknown, ...a: unknown[]) {
    readbacks++;
    return saved.read.apply(this, a);
  };
  backend.readSync = function (this: unknown, ...a: unknown[]) {
    readbacks++;
    return saved.readSync.apply(this, a);
  };
  try {
    return { result: await fn(), dispatches, readbacks };
  } finally {
    for (const n of names) delete backend[n];
    if (own.length) Object.assign(backend, { runWebGPUProgram: saved.run, read: saved.read, readSync: saved.readSync });
  }
}
