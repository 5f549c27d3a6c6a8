#!/usr/bin/env bash
# Unpacks Debian unstable's libeigen3-dev (Eigen 5, headers only) into a folder of this checkout
# (default build/eigen5-package), for building against Eigen 5 beside the system's Eigen 3.4
# (the eigen5 preset reads it from there). Nothing is installed: apt works on a private state
# folder, with the mirror this machine already uses for Debian, and dpkg -x only unpacks.
# Usage: scripts/fetch_eigen5.sh [destination]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$(realpath -m "${1:-build/eigen5-package}")

if [ -f "$dest/usr/share/eigen3/cmake/Eigen3Config.cmake" ]; then
  echo "fetch_eigen5: already unpacked in $dest"
  exit 0
fi

# The Debian mirror of this machine's own sources (deb822 or one-line format).
mirror=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/*.sources \
           2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(grep -hEo '^deb +[^ ]+ +[a-z]+ ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
             2>/dev/null | awk '$2 !~ /security/ { print $2; exit }' || true)
fi
if [ -z "$mirror" ]; then
  echo "fetch_eigen5: cannot find this machine's Debian mirror in /etc/apt/sources.list*" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial"
cat > "$work/sources/unstable.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: unstable
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
# A private apt state: the machine's own sources, lists and cache stay as they are. The Release
# file of a snapshot mirror is past its Valid-Until date, hence the last option.
apt_options=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/sources"
             -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
             -o Acquire::Languages=none -o Acquire::Check-Valid-Until=false)
# As root apt downloads as the user _apt, who cannot write to the private folder.
[ "$(id -u)" -eq 0 ] && apt_options+=(-o APT::Sandbox::User=root)
apt-get "${apt_options[@]}" update
(cd "$work" && apt-get "${apt_options[@]}" download libeigen3-dev)
deb=$(ls "$work"/libeigen3-dev_*.deb)
echo "fetch_eigen5: unpacking $(basename "$deb") into $dest"
mkdir -p "$dest"
dpkg -x "$deb" "$dest"
grep -h '#define EIGEN_\(WORLD\|MAJOR\|MINOR\|PATCH\)_VERSION' "$dest/usr/include/eigen3/Eigen/Version"
