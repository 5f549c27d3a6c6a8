#!/usr/bin/env bash
# Installs what building, testing and benchmarking mha needs on Debian 12 or Ubuntu 24.04:
# a C++17 compiler, CMake >= 3.25, Ninja, Eigen 3.4, Catch2 v3, Google Benchmark and
# nlohmann-json (for the optional mha/io/safetensors.hpp, its tests and the PyTorch check example),
# pkg-config (for the test of the installed pkg-config files), Open MPI (for the optional ring
# attention example and its test, examples/ring_attention_mpi.cpp).
# Debian 12 ships Catch2 v2 in main, so v3 comes from the distribution's own backports suite.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  exec sudo "$0" "$@"
fi

export DEBIAN_FRONTEND=noninteractive
packages=(g++ cmake ninja-build libeigen3-dev libbenchmark-dev nlohmann-json3-dev pkg-config catch2
          libopenmpi-dev openmpi-bin)

# Skip the network when everything is already there.
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ] && dpkg --compare-versions \
     "$(dpkg-query -W -f='${Version}' catch2)" ge 3; then
  echo "install_dependencies: everything is installed"
  exit 0
fi

. /etc/os-release
catch2_suite=()
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  # Enable bookworm-backports on the mirror this machine already uses.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    if ! grep -q 'bookworm-backports' /etc/apt/sources.list.d/debian.sources; then
      sed -i '0,/^Suites: bookworm\( .*\)\?$/s//& bookworm-backports/' \
        /etc/apt/sources.list.d/debian.sources
    fi
  fi
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(grep -hEo '^deb +[^ ]+ +bookworm +main' /etc/apt/sources.list 2>/dev/null |
             head -n 1 | awk '{print $2}')
    if [ -z "$mirror" ]; then
      echo "install_dependencies: cannot find this machine's Debian mirror to add bookworm-backports" >&2
      exit 1
    fi
    echo "deb $mirror bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
  fi
  catch2_suite=(-t bookworm-backports)
fi

apt-get update
apt-get install -y --no-install-recommends g++ cmake ninja-build libeigen3-dev libbenchmark-dev \
  nlohmann-json3-dev pkg-config libopenmpi-dev openmpi-bin
apt-get install -y --no-install-recommends "${catch2_suite[@]}" catch2
