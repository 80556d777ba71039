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
  code: string;
}

/** True when the active tfjs backend is webgpu (custom WGSL kernels can run). */
export function isWebGpuBackend(): boolean {
  return tf.getBackend() === 'webgpu';
}

interface WebGpuRunner {
  runWebGPUProgram(program: unknown, inputs: tf.TensorInfo[], dtype: tf.DataType): tf.TensorInfo;
}

/**
 * Dispatches a {@link WgslKernel} on the webgpu backend and returns its output tensor.
 * @throws KvpackError('unsupported') off the webgpu backend; KvpackError('shape') for an empty
 * output or a dispatch beyond 65,535 workgroups in a dimension.
 */
export function runWgsl(k: WgslKernel): tf.Tensor {
  check(isWebGpuBackend(), 'unsupported', `WGSL kernel ${k.key} needs the webgpu backend, not ${tf.getBackend()}`);
  check(k.names.length === k.inputs.length, 'shape', `WGSL kernel ${k.key}: ${k.names.length} names for ${k.inputs.length} inputs`);
  check(k.outputShape.every((v) => Number.isInteger(v) && v > 0), 'shape', `WGSL kernel ${k.key}: output shape [${k.outputShape}] must be positive`);
  check(k.dispatch.every((v) => Number.isInteger(v) && v > 0 && v <= 65535), 'shape', `WGSL kernel ${k.key}: dispatch [${k.dispatch}] is outside 1 … 65,535`);
  const program = {
    variableNames: k.names,
    outputShape: k.outputShape,
    shaderKey: `kvpack_${k.key}`,
    // A flat layout: tfjs then calls main(index) and leaves the dispatch as given.
    dispatchLayout: { x: k.outputShape.map((_, i) => i) },
    dispatch: k.dispatch,
    workgroupSize: [k.workgroupSize, 1, 1] as [number, number, number],
    // tfjs always binds its uniform buffer; a pipeline whose shader never reads it has no such binding
    // and Dawn rejects the bind group. The wrapper reads one uniform (NAN, always NaN, so the branch is
    // never taken; uniform data keeps the kernel's barriers in uniform control flow).
    getUserCode: () => `${k.code}\nfn main(index: i32) {\n  if (uniforms.NAN == 1.0) { return; }\n  kernel(index);\n}`,
  };
  const backend = tf.backend() as unknown as WebGpuRunner;
  const info = backend.runWebGPUProgram(program, k.inputs, k.dtype);
  return tf.engine().makeTensorFromTensorInfo(info);
}
