import { unavailable } from './unavailable.js';

export const existsSync = (p: string): never => unavailable(`reading the file ${p}`);
export const statSync = (p: string): never => unavailable(`reading the file ${p}`);
export const readFileSync = (p: string): never => unavailable(`reading the file ${p}`);
export const readdirSync = (p: string): never => unavailable(`listing the directory ${p}`);
export const writeFileSync = (p: string): never => unavailable(`writing the file ${p}`);
export const renameSync = (p: string): never => unavailable(`renaming the file ${p}`);
export const mkdirSync = (p: string): never => unavailable(`creating the directory ${p}`);
export const mkdtempSync = (p: string): never => unavailable(`creating the directory ${p}`);
export const rmSync = (p: string): never => unavailable(`removing ${p}`);
