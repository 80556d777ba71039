import { unavailable } from './unavailable.js';

export const spawnSync = (): never => unavailable('starting a child process');
