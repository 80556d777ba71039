// POSIX path arithmetic (names in messages, URL-like model paths): the subset kvpack uses.
const trim = (p: string): string => (p.length > 1 ? p.replace(/\/+$/, '') : p);

export const sep = '/';
export function basename(p: string, ext?: string): string {
  const b = trim(p).split('/').pop() ?? '';
  return ext && b.endsWith(ext) && b !== ext ? b.slice(0, -ext.length) : b;
}
export function dirname(p: string): string {
  const t = trim(p);
  const i = t.lastIndexOf('/');
  return i < 0 ? '.' : i === 0 ? '/' : t.slice(0, i);
}
export function extname(p: string): string {
  const b = basename(p);
  const i = b.lastIndexOf('.');
  return i <= 0 ? '' : b.slice(i);
}
export function isAbsolute(p: string): boolean {
  return p.startsWith('/');
}
export function normalize(p: string): string {
  const abs = p.startsWith('/');
  const out: string[] = [];
  for (const s of p.split('/')) {
    if (s === '' || s === '.') continue;
    if (s === '..' && out.length && out[out.length - 1] !== '..') out.pop();
    else if (s !== '..' || !abs) out.push(s);
  }
  const r = (abs ? '/' : '') + out.join('/');
  return r || (abs ? '/' : '.');
}
export function join(...parts: string[]): string {
  return normalize(parts.filter((x) => x !== '').join('/'));
}
export function resolve(...parts: string[]): string {
  let r = '';
  for (const p of parts) r = p.startsWith('/') ? p : r ? `${r}/${p}` : p;
  return normalize(r.startsWith('/') ? r : `/${r}`);
}
export default { sep, basename, dirname, extname, isAbsolute, normalize, join, resolve };
