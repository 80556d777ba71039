import { unavailable } from './unavailable.js';

export const fileURLToPath = (u: string | URL): never => unavailable(`the file URL ${String(u)}`);
export const pathToFileURL = (p: string): never => unavailable(`the file path ${p}`);
