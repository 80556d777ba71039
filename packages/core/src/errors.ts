/** Machine-readable category of a {@link KvpackError}. */
export type KvpackErrorCode =
  | 'shape'
  | 'dtype'
  | 'nonfinite'
  | 'rank'
  | 'layout'
  | 'corrupt'
  | 'truncated'
  | 'config'
  | 'unknown-strategy'
  | 'io'
  | 'unsupported'
  | 'model'
  | 'disposed';

/**
 * The one error type kvpack throws for bad input. `code` names the problem class; the message names
 * the offending file, tensor or option and what was expected.
 */
export class KvpackError extends Error {
  readonly code: KvpackErrorCode;
  constructor(code: KvpackErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'KvpackError';
    this.code = code;
  }
}

/** Throws a {@link KvpackError} with `code` unless `cond` holds. */
export function check(cond: unknown, code: KvpackErrorCode, message: string | (() => string)): asserts cond {
  if (!cond) throw new KvpackError(code, typeof message === 'string' ? message : message());
}
