// Stands in for vega / vega-lite in the GPU bundles: the GPU entries draw no plots, and vega's
// Node build cannot be bundled to CommonJS (top-level await in vega-canvas).
module.exports = new Proxy({}, { get: (_, k) => (k === '__esModule' ? false : () => { throw new Error('plots are not available in the GPU bundle'); }) });
