#!/usr/bin/env bash
# Best effort: gives a machine without a GPU a software WebGPU adapter (Mesa's lavapipe Vulkan driver,
# which Dawn accepts from Mesa 24 on), so that the WGSL kernel tests (packages/xkv/src/sparse-webgpu.test.ts)
# run instead of skipping. Debian bookworm ships Mesa 22.3, which Dawn rejects
# ("shaderUniform*ArrayDynamicIndexing required"), so the driver comes from bookworm-backports.
# Never fails: without root, apt or the packages, it says why and the tests skip with a message.
# `auto` backend selection passes over software adapters (they are slower than wasm); only code that
# asks for webgpu by name uses them.
set -u
say() { echo "[webgpu-software] $*"; }
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then say "skipped: needs root and apt-get"; exit 0; fi
. /etc/os-release 2>/dev/null || true
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/kvpack-bookworm-backports.list
  target=(-t bookworm-backports)
else
  target=()
fi
if apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1; then
  say "installed $(dpkg-query -W -f='mesa-vulkan-drivers ${Version}' mesa-vulkan-drivers 2>/dev/null)"
else
  say "could not install mesa-vulkan-drivers; the WGSL kernel tests will skip"
fi
exit 0
