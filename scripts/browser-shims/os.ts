export const cpus = (): unknown[] => Array.from({ length: globalThis.navigator?.hardwareConcurrency ?? 1 }, () => ({}));
export const tmpdir = (): string => '/tmp';
