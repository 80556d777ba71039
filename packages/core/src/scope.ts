import * as tf from '@tensorflow/tfjs-core';

/** The parts of tfjs's engine that scope tensor ownership (public on the Engine class, not re-exported as types). */
interface ScopingEngine {
  startScope(name?: string): void;
  endScope(result?: tf.TensorContainer): void;
  state: { activeScope: { track: tf.Tensor[] } | null };
}

/**
 * Runs a synchronous `fn` in a tfjs scope: if it throws, every tensor it created and that is still
 * alive is disposed before the error propagates, so a failed restore or build leaks nothing; if it
 * returns, every tensor it created and left alive is handed to the enclosing scope (as `tf.tidy` does
 * with what it returns), owned by whatever `fn` returned and freed by that object's `dispose()` — so
 * an enclosing call of this function that fails afterwards frees them too. Not for asynchronous work:
 * tfjs scopes are not safe across an `await`.
 */
export function disposeCreatedOnError<T>(fn: () => T): T {
  const engine = tf.engine() as unknown as ScopingEngine;
  engine.startScope('kvpack.disposeCreatedOnError');
  const scope = engine.state.activeScope;
  let out: T;
  try {
    out = fn();
  } catch (e) {
    engine.endScope();
    throw e;
  }
  engine.endScope((scope?.track ?? []).filter((t) => !t.isDisposed));
  return out;
}
