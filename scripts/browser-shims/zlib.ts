// No native CRC-32 in the browser: core's crc32 falls back to its table implementation.
export const crc32: undefined = undefined;
