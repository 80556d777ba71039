/**
 * Registers tfjs's chained ops (x.reshape(), x.mul(), …) on the Tensor class that
 * `@tensorflow/tfjs-core` resolves to at run time.
 *
 * tfjs-core alone does not register them: the full `@tensorflow/tfjs` package imports
 * `dist/public/chained_ops/register_all_chained_ops`, an ES module that plain Node cannot load (its
 * imports lack file extensions) and that would patch the ESM copy of Tensor, not the CommonJS copy
 * Node resolves. So kvpack installs the same methods from the public functional API, once, on
 * whichever Tensor class is in use; methods already present are left alone. The type-only import
 * below brings the matching method declarations.
 */
import * as tf from '@tensorflow/tfjs-core';
import type {} from '@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops';

type Fn = (...args: unknown[]) => unknown;
const ops = tf as unknown as Record<string, Fn>;

/** Chained ops that are `op(this, ...args)` under the same name. */
const SAME_NAME = `abs acos acosh add all any argMax argMin asin asinh atan atan2 atanh batchNorm batchToSpaceND
broadcastTo cast ceil clipByValue conv1d conv2d cos cosh cumprod cumsum depthToSpace div divNoNan dot elu equal erf
euclideanNorm exp expandDims expm1 fft floor floorDiv gather greater greaterEqual ifft irfft isFinite isInf isNaN
leakyRelu less lessEqual log log1p logSigmoid logSoftmax logSumExp logicalAnd logicalNot logicalOr logicalXor matMul
max maximum mean min minimum mirrorPad mod mul neg norm notEqual oneHot onesLike pad pool pow prelu prod reciprocal
relu relu6 reshape reverse rfft round rsqrt selu sigmoid sign sin sinh slice softmax softplus spaceToBatchND split
sqrt square squaredDifference squeeze step stridedSlice sub sum tan tanh tile topk transpose unique unstack
zerosLike`.split(/\s+/);

function install(): void {
  const proto = (tf.Tensor as unknown as { prototype: Record<string, unknown> }).prototype;
  const def = (name: string, f: (this: tf.Tensor, ...a: unknown[]) => unknown) => {
    if (typeof proto[name] !== 'function') proto[name] = f;
  };
  for (const name of SAME_NAME) {
    const op = ops[name];
    if (typeof op === 'function') def(name, function (this: tf.Tensor, ...a: unknown[]) { return op(this, ...a); });
  }
  def('concat', function (this, x, axis) {
    return tf.concat([this, ...(Array.isArray(x) ? (x as tf.Tensor[]) : [x as tf.Tensor])], axis as number);
  });
  def('stack', function (this, x, axis) {
    return tf.stack([this, ...(Array.isArray(x) ? (x as tf.Tensor[]) : [x as tf.Tensor])], axis as number);
  });
  def('where', function (this, condition, x) {
    return tf.where(condition as tf.Tensor, this, x as tf.Tensor);
  });
  def('reshapeAs', function (this, x) {
    return tf.reshape(this, (x as tf.Tensor).shape);
  });
  def('flatten', function (this) {
    return tf.reshape(this, [this.size]);
  });
  def('asScalar', function (this) {
    return tf.reshape(this, []);
  });
  def('as1D', function (this) {
    return tf.reshape(this, [this.size]);
  });
  for (const [name, rank] of [['as2D', 2], ['as3D', 3], ['as4D', 4], ['as5D', 5]] as const) {
    def(name, function (this, ...dims) {
      return tf.reshape(this, dims.slice(0, rank) as number[]);
    });
  }
  def('asType', function (this, dtype) {
    return tf.cast(this, dtype as tf.DataType);
  });
  def('toFloat', function (this) {
    return tf.cast(this, 'float32');
  });
  def('toInt', function (this) {
    return tf.cast(this, 'int32');
  });
  def('toBool', function (this) {
    return tf.cast(this, 'bool');
  });
}

install();
