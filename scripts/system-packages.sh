#!/usr/bin/env bash
# Installs the Debian packages cachedattn needs, only those missing, on a fresh
# Debian/Ubuntu machine: as root directly, as any other user through sudo.
# Packages: liburing-dev (io_uring backend), fio (disk benchmark), g++ (build),
# redis-server (the remote tier's tests and benchmark start their own Redis servers).
# Without apt-get (another distribution) it says what to install and goes on.
set -euo pipefail

PACKAGES=(liburing-dev fio g++ redis-server)

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: no apt-get here; make sure these are installed: ${PACKAGES[*]}" >&2
  exit 0
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# env(1) carries DEBIAN_FRONTEND through sudo and works without it (a bare
# `VAR=value cmd` after an empty $SUDO is not an assignment but a command name).
run=(env DEBIAN_FRONTEND=noninteractive)
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "setup: not root and no sudo: install ${missing[*]} as root, then run this again" >&2
    exit 1
  fi
  run=(sudo "${run[@]}")
fi
echo "setup: installing ${missing[*]}"
"${run[@]}" apt-get update -q
"${run[@]}" apt-get install -y -q "${missing[@]}"
