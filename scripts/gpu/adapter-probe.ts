// Prints what the WebGPU adapter offers kvpack's kernels (bundled like gpu-perf.ts; run on the GPU host):
// the adapter's info, features and limits, whether a device can be requested with 'shader-f16',
// 'subgroups' and Dawn's subgroup-matrix feature, and whether a WGSL module using each compiles.
//
//   node scripts/gpu/bundle.mjs scripts/gpu/adapter-probe.ts gpu-bundle/probe     (here)
//   KVPACK_DAWN_NODE=$PWD/gpu-bundle/dawn.node /tmp/node gpu-bundle/probe/entry.cjs [--json FILE]   (GPU host)
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

type Any = Record<string, unknown> & { [k: string]: any }; // eslint-disable-line @typescript-eslint/no-explicit-any

const SHADERS: Record<string, { feature: string; code: string }> = {
  'shader-f16': {
    feature: 'shader-f16',
    code: `enable f16;
@group(0) @binding(0) var<storage, read_write> o: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3u) { let h = f16(o[g.x]); o[g.x] = f32(h * h); }`,
  },
  subgroups: {
    feature: 'subgroups',
    code: `enable subgroups;
@group(0) @binding(0) var<storage, read_write> o: array<f32>;
@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3u) { o[g.x] = subgroupAdd(o[g.x]); }`,
  },
  'subgroup-matrix': {
    feature: 'chromium-experimental-subgroup-matrix',
    code: `enable f16;
enable chromium_experimental_subgroup_matrix;
@group(0) @binding(0) var<storage, read_write> a: array<f16>;
@group(0) @binding(1) var<storage, read_write> c: array<f32>;
@compute @workgroup_size(32) fn main() {
  let l = subgroupMatrixLoad<subgroup_matrix_left<f16, 8, 8>>(&a, 0, false, 8);
  let r = subgroupMatrixLoad<subgroup_matrix_right<f16, 8, 8>>(&a, 64, false, 8);
  var acc = subgroup_matrix_result<f32, 8, 8>();
  acc = subgroupMatrixMultiplyAccumulate(l, r, acc);
  subgroupMatrixStore(&c, 0, acc, false, 8);
}`,
  },
};

async function main(): Promise<void> {
  const jsonAt = process.argv.indexOf('--json');
  const req = createRequire(__filename);
  const dawn = req(process.env.KVPACK_DAWN_NODE || 'webgpu') as Any;
  Object.assign(globalThis, dawn.globals);
  const gpu = dawn.create([]) as Any;
  const adapter = (await gpu.requestAdapter({ powerPreference: 'high-performance' })) as Any | null;
  if (!adapter) throw new Error('no adapter');
  const info: Any = {};
  for (const k in adapter.info) info[k] = adapter.info[k];
  const limits: Any = {};
  for (const k in adapter.limits) limits[k] = adapter.limits[k];
  const features = [...adapter.features].sort();
  const out: Any = { info, features, limits, devices: {}, shaders: {} };
  for (const [name, s] of Object.entries(SHADERS)) {
    if (!adapter.features.has(s.feature)) {
      out.shaders[name] = `adapter lacks '${s.feature}'`;
      continue;
    }
    try {
      const extra = name === 'subgroup-matrix' ? ['shader-f16', s.feature] : [s.feature];
      // An adapter gives one device: ask for a fresh one per feature.
      const a = (await gpu.requestAdapter({ powerPreference: 'high-performance' })) as Any;
      const device = (await a.requestDevice({ requiredFeatures: extra })) as Any;
      out.devices[name] = 'ok';
      device.pushErrorScope('validation');
      const mod = device.createShaderModule({ code: s.code });
      const ci = await mod.getCompilationInfo();
      const err = await device.popErrorScope();
      out.shaders[name] = err ? `error: ${err.message}` : ci.messages.length ? ci.messages.map((m: Any) => `${m.type}: ${m.message}`).join('; ') : 'compiles';
      device.destroy();
    } catch (e) {
      out.devices[name] = `requestDevice failed: ${(e as Error).message}`;
    }
  }
  const text = JSON.stringify(out, null, 2);
  console.log(text);
  if (jsonAt > 0) writeFileSync(process.argv[jsonAt + 1], text);
  process.exit(0);
}

main().catch((e) => {
  console.error(`adapter-probe: ${(e as Error).stack}`);
  process.exit(1);
});
