import { KvpackError, check, type StoredDType } from '@kvpack/core';

/*
 * The kept positions of a composed cache in their smallest exact form, chosen from T and n alone (so a
 * restore knows it): per layer either a bit mask [H_kv, ⌈T/8⌉] (bit t of head h's row, lowest bit
 * first, set when token t is kept) or the position list [n, H_kv] as uint16 (T ≤ 65,536) or int32.
 */

/** How a composed cache stores the kept positions of one layer. */
export type PositionEncoding = 'mask' | 'uint16' | 'int32';

/** The smaller of a T-bit mask and an n-entry list per KV head (the mask on a tie). */
export function positionEncoding(T: number, n: number): PositionEncoding {
  const list = T <= 65536 ? 2 * n : 4 * n;
  if (Math.ceil(T / 8) <= list) return 'mask';
  return T <= 65536 ? 'uint16' : 'int32';
}

/** Bytes of one layer's stored positions: H_kv · ⌈T/8⌉ (mask) or H_kv · n · 2 or 4 (list). */
export function positionLayerBytes(H: number, T: number, n: number): number {
  const e = positionEncoding(T, n);
  return H * (e === 'mask' ? Math.ceil(T / 8) : n * (e === 'uint16' ? 2 : 4));
}

/** Dtype and shape of one layer's stored positions. */
export function positionSpec(H: number, T: number, n: number): { dtype: StoredDType; shape: number[] } {
  const e = positionEncoding(T, n);
  return e === 'mask' ? { dtype: 'uint8', shape: [H, Math.ceil(T / 8)] } : { dtype: e, shape: [n, H] };
}

/** Encodes positions [n, H] row-major (ascending per head, in [0, T)) in their {@link positionEncoding}. */
export function encodePositions(p: Int32Array, T: number, H: number): Uint8Array | Uint16Array | Int32Array {
  const n = p.length / H;
  const e = positionEncoding(T, n);
  if (e === 'uint16') return Uint16Array.from(p);
  if (e === 'int32') return Int32Array.from(p);
  const row = Math.ceil(T / 8);
  const out = new Uint8Array(H * row);
  for (let j = 0; j < n; j++)
    for (let h = 0; h < H; h++) {
      const t = p[j * H + h];
      out[h * row + (t >> 3)] |= 1 << (t & 7);
    }
  return out;
}

/**
 * Decodes stored positions back to [n, H] row-major, ascending per head.
 * @throws KvpackError('corrupt') naming `name` when a mask row does not hold exactly n kept tokens,
 *   or a list holds a position outside [0, T) or not ascending per head.
 */
export function decodePositions(data: ArrayLike<number>, T: number, n: number, H: number, strategy: string, name: string): Int32Array {
  const e = positionEncoding(T, n);
  const out = new Int32Array(n * H);
  if (e === 'mask') {
    const row = Math.ceil(T / 8);
    for (let h = 0; h < H; h++) {
      let j = 0;
      for (let t = 0; t < row * 8; t++) {
        if (!((data[h * row + (t >> 3)] >> (t & 7)) & 1)) continue;
        if (t >= T || j >= n) throw new KvpackError('corrupt', `serialized ${strategy} cache is corrupt: "${name}" marks ${t >= T ? `token ${t} beyond T = ${T}` : `more than ${n} kept tokens`} for KV head ${h}`);
        out[j++ * H + h] = t;
      }
      check(j === n, 'corrupt', `serialized ${strategy} cache is corrupt: "${name}" marks ${j} kept tokens for KV head ${h}, expected ${n}`);
    }
    return out;
  }
  for (let i = 0; i < n * H; i++) {
    out[i] = data[i];
    check(out[i] >= 0 && out[i] < T && (i < H || out[i] > out[i - H]), 'corrupt', `serialized ${strategy} cache is corrupt: "${name}" holds a position outside [0, ${T}) or out of order`);
  }
  return out;
}
