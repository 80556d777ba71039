// A third-party strategy package as the CLI sees it: importing it registers a strategy, and its
// `register()` export (which the CLI calls too) registers it again, idempotently.
import { getStrategyDefinition, registerStrategy } from '@kvpack/core';

const dense = getStrategyDefinition('dense');
export const pluginDefinition = { ...dense, name: 'plugin-dense', description: 'the dense cache, registered by a plugin' };

export function register() {
  registerStrategy(pluginDefinition);
}
register();
