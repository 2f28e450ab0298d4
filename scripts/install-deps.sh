#!/usr/bin/env bash
# Installs what building and testing ratekeeper needs on Debian 12, if missing.
# As root it uses apt-get; otherwise sudo; otherwise it says what to install.
#
#   scripts/install-deps.sh            everything for `make demo` (and the
#                                      release preset, tests included)
#                                      (stunnel4 and openssl: the release
#                                      preset's Redis TLS test; libasio-dev:
#                                      the event-loop example)
#   scripts/install-deps.sh --test     plus what `make test` needs (clang 14,
#                                      its sanitizer runtimes, clang-format 14)
#   scripts/install-deps.sh --bench    plus what `make bench` needs (Google
#                                      Benchmark, python3, gnuplot)
#   scripts/install-deps.sh --aarch64  what `make test-aarch64` needs: the
#                                      AArch64 cross compiler, qemu-user, and
#                                      the arm64 libraries (Debian multiarch;
#                                      adds the arm64 architecture to dpkg)
set -euo pipefail

packages=(cmake ninja-build g++ make pkg-config libabsl-dev libfmt-dev catch2
          libcpp-httplib-dev nlohmann-json3-dev libssl-dev tzdata libhiredis-dev
          redis-server stunnel4 openssl libasio-dev)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(clang-14 libclang-rt-14-dev clang-format-14)
elif [[ "${1:-}" == "--bench" ]]; then
  packages+=(libbenchmark-dev python3 gnuplot-nox)
elif [[ "${1:-}" == "--aarch64" ]]; then
  packages+=(g++-aarch64-linux-gnu qemu-user-static libabsl-dev:arm64
             libfmt-dev:arm64 libssl-dev:arm64 libhiredis-dev:arm64)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "ratekeeper: installing missing packages: ${missing[*]}"
if [[ $(id -u) -eq 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo)
elif command -v sudo >/dev/null 2>&1 && [[ -t 0 ]]; then
  sudo=(sudo)  # sudo will ask for a password on this terminal
else
  echo "ratekeeper: cannot install packages: not root and no usable sudo." >&2
  echo "Ask an administrator to run:" >&2
  echo "  apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [[ "${1:-}" == "--aarch64" ]] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  "${sudo[@]}" dpkg --add-architecture arm64
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
