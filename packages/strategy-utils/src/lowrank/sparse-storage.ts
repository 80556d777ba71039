import { check, type ModelLayout, type StoredReader, type StoredSpec, type StoredTensor } from '@kvpack/core';
import { sparseGeometry, type SparseIndex } from './sparse-index.js';
import type { SparseOptions } from './sparse-options.js';

/* Serialization of the sparse index: six tensors per layer (`sparse.*.l`) and the geometry in the header meta. */

/** Names, dtypes and shapes of one layer's six stored sparse-index tensors. */
function layerSpecs(l: number, ix: SparseIndex, layout: ModelLayout): StoredSpec[] {
  const { nKvHeads: H, headDim: d } = layout;
  const { chunks: C, outliers: O, local, chunkSize: c } = ix;
  return [
    { name: `sparse.landmarks.${l}`, dtype: 'float16', shape: [C, H, d] },
    { name: `sparse.outliers.${l}`, dtype: 'int32', shape: [H, O] },
    { name: `sparse.outlier.k.${l}`, dtype: 'float16', shape: [H, O * c, d] },
    { name: `sparse.outlier.v.${l}`, dtype: 'float16', shape: [H, O * c, d] },
    { name: `sparse.local.k.${l}`, dtype: 'float16', shape: [local, H, d] },
    { name: `sparse.local.v.${l}`, dtype: 'float16', shape: [local, H, d] },
  ];
}

/** The stored sparse-index tensors, in serialization order (six per layer, as {@link layerSpecs}). */
export function sparseTensors(ix: SparseIndex, layout: ModelLayout): StoredTensor[] {
  return ix.layers.flatMap((L, l) => {
    const s = layerSpecs(l, ix, layout);
    const data = [L.landmarks, L.outlierChunks, L.outlierK, L.outlierV, L.localK, L.localV];
    return s.map((spec, i) => ({ ...spec, data: data[i] }));
  });
}

/** Sparse-index metadata written to the serialization. */
export function sparseMeta(ix: SparseIndex): Record<string, number> {
  return { chunkSize: ix.chunkSize, chunks: ix.chunks, outliers: ix.outliers, local: ix.local };
}

/**
 * Restores a sparse index from a decoded container.
 * @throws KvpackError('corrupt') naming the tensor whose dtype, shape or contents are wrong.
 */
export function loadSparseIndex(r: StoredReader, strategy: string, layout: ModelLayout, T: number, o: SparseOptions): SparseIndex {
  const g = sparseGeometry(T, o);
  const meta = r.header.meta.sparse as Record<string, number> | undefined;
  check(
    meta && meta.chunkSize === o.chunkSize && meta.chunks === g.chunks && meta.outliers === g.outliers && meta.local === g.local,
    'corrupt',
    `serialized ${strategy} cache has sparse index ${JSON.stringify(meta ?? null)}, but its options give ${JSON.stringify({ chunkSize: o.chunkSize, ...g })}`,
  );
  const ix: SparseIndex = { options: o, chunkSize: o.chunkSize, ...g, layers: [] };
  for (let l = 0; l < layout.nLayers; l++) {
    const data = layerSpecs(l, ix, layout).map((spec) => r.host(spec.name, spec));
    const outl = data[1] as Int32Array;
    check(
      outl.every((v) => v >= 0 && v < g.chunks),
      'corrupt',
      `serialized ${strategy} cache is corrupt: tensor "sparse.outliers.${l}" holds a chunk index outside [0, ${g.chunks})`,
    );
    ix.layers.push({
      landmarks: data[0] as Uint16Array,
      outlierChunks: outl,
      outlierK: data[2] as Uint16Array,
      outlierV: data[3] as Uint16Array,
      localK: data[4] as Uint16Array,
      localV: data[5] as Uint16Array,
    });
  }
  return ix;
}
