import type { ResolvedSetting } from './config.js';
import { strategyQueryWindow } from './strategy.js';

/**
 * The query window a setting's prefill must carry: the config's `observationWindow`, else the window
 * the strategy declares it reads (capability `queryWindow`); null when the strategy reads no queries.
 */
export function settingQueryWindow(setting: ResolvedSetting): number | null {
  if (setting.observationWindow) return setting.observationWindow;
  return strategyQueryWindow(setting) || null;
}
