/**
 * The register-tiled core shared by kvpack's WGSL GEMMs (the range finder's products, SnapKV's window
 * logits): per invocation a TM×TN micro-tile of vec4 accumulators (rows strided by 4·BM/TM, columns by
 * 4·BN/TN, so neighbouring invocations read neighbouring vec4s of the k-major slabs `As` [BK, SA] and
 * `Bs` [BK, SB]), BK-deep slabs staged through registers with the next slab prefetched while the
 * current one is multiplied, and bounds-checked writes of the tile. The caller's shader declares the
 * constants BM, BN, BK, SA, SB, the workgroup arrays `As`, `Bs` (vec4), `lid`, `tx`, `ty`, `m0`, `n0`
 * and a uniform slab count, and supplies the slab loads and stores for its operand layouts.
 */
export interface GemmTileParts {
  /** Accumulator rows per invocation ÷ 4 (TM / 4) and columns ÷ 4 (TN / 4). */
  tm4: number;
  tn4: number;
  /** Invocations along the tile's rows (BM / TM) and columns (BN / TN). */
  ty: number;
  tx: number;
  /** vec4 groups of the A slab and of the B slab each invocation loads (registers ra0…, rb0…). */
  la: number;
  lb: number;
  /** WGSL expression of the first slab's k offset, and the name of the (uniform) slab count. */
  start: string;
  slabs: string;
  /** Loads of the slab at k offset `kb` into ra* / rb*, and their stores into As / Bs. */
  loadA(kb: string): string;
  loadB(kb: string): string;
  storeA: string;
  storeB: string;
  /** WGSL names of the output's row and column counts, and the flat output index of (gm, gn). */
  rows: string;
  cols: string;
  out(gm: string, gn: string): string;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);
const COMPS = ['x', 'y', 'z', 'w'];

/** The WGSL of the tile: register declarations, the slab loop and the writes. */
export function gemmTileWgsl(p: GemmTileParts): string {
  const { tm4, tn4 } = p;
  const fmas: string[] = [];
  for (let i = 0; i < tm4; i++)
    for (let c = 0; c < 4; c++) {
      fmas.push(`      let s${i * 4 + c} = vec4<f32>(a${i}.${COMPS[c]});`);
      for (let q = 0; q < tn4; q++) fmas.push(`      c${i * 4 + c}_${q} = fma(s${i * 4 + c}, b${q}, c${i * 4 + c}_${q});`);
    }
  const writes: string[] = [];
  for (let i = 0; i < tm4; i++)
    for (let c = 0; c < 4; c++) {
      writes.push(`  { let gm = m0 + ${i * p.ty * 4}u + ty * 4u + ${c}u;\n    if (gm < ${p.rows}) {`);
      for (let q = 0; q < tn4; q++)
        writes.push(`      { let gn = n0 + ${q * p.tx * 4}u + tx * 4u; let o = ${p.out('gm', 'gn')}; let v = c${i * 4 + c}_${q};
        if (gn + 3u < ${p.cols}) { result[o] = v.x; result[o + 1u] = v.y; result[o + 2u] = v.z; result[o + 3u] = v.w; }
        else { if (gn < ${p.cols}) { result[o] = v.x; } if (gn + 1u < ${p.cols}) { result[o + 1u] = v.y; } if (gn + 2u < ${p.cols}) { result[o + 2u] = v.z; } } }`);
      writes.push('    }\n  }');
    }
  return `${range(tm4 * 4)
    .flatMap((r) => range(tn4).map((q) => `  var c${r}_${q} = vec4<f32>(0.0);`))
    .join('\n')}
${range(p.la)
  .map((j) => `  var ra${j}: vec4<f32>;`)
  .join('\n')}
${range(p.lb)
  .map((j) => `  var rb${j}: vec4<f32>;`)
  .join('\n')}
  // Slab 0 into registers.
${p.loadA(p.start)}
${p.loadB(p.start)}
  for (var s = 0u; s < ${p.slabs}; s++) {
${p.storeA}
${p.storeB}
    workgroupBarrier();
    if (s + 1u < ${p.slabs}) {
      let kb = ${p.start} + (s + 1u) * BK;
${p.loadA('kb')}
${p.loadB('kb')}
    }
    for (var kk = 0u; kk < BK; kk++) {
${range(tm4)
  .map((i) => `      let a${i} = As[kk * SA + ${i * p.ty}u + ty];`)
  .join('\n')}
${range(tn4)
  .map((q) => `      let b${q} = Bs[kk * SB + ${q * p.tx}u + tx];`)
  .join('\n')}
${fmas.join('\n')}
    }
    workgroupBarrier();
  }
${writes.join('\n')}`;
}
