import { unavailable } from './unavailable.js';

export const readFile = async (p: string): Promise<never> => unavailable(`reading the file ${p}`);
export const writeFile = async (p: string): Promise<never> => unavailable(`writing the file ${p}`);
export const open = async (p: string): Promise<never> => unavailable(`opening the file ${p}`);
export type FileHandle = never;
