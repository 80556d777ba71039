// A third-party strategy package as the CLI sees it: importing it registers a strategy.
import { getStrategyDefinition, registerStrategy } from '@kvpack/core';

const dense = getStrategyDefinition('dense');
export const pluginDefinition = { ...dense, name: 'plugin-dense', description: 'the dense cache, registered by a plugin' };
registerStrategy(pluginDefinition);
