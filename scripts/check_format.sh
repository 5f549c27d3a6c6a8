#!/usr/bin/env bash
# Checks that every C++ file follows .clang-format: *.hpp and *.cpp under include, tests (but
# not tests/data), examples, bench and fuzz. Changes nothing: prints the files that differ and
# exits non-zero. `clang-format --dry-run FILE` shows what differs; `clang-format -i FILE`
# formats it. CLANG_FORMAT names the binary (default clang-format; Debian 12 has version 14).
set -euo pipefail
cd "$(dirname "$0")/.."

format=${CLANG_FORMAT:-clang-format}
if ! command -v "$format" > /dev/null; then
  echo "check_format: $format not found (Debian: apt-get install clang-format)" >&2
  exit 2
fi

dirs=()
for d in include tests examples bench fuzz; do [ -d "$d" ] && dirs+=("$d"); done
mapfile -d '' files < <(find "${dirs[@]}" -path tests/data -prune -o -type f \
                          \( -name '*.hpp' -o -name '*.cpp' \) -print0 | LC_ALL=C sort -z)

differ=()
for f in "${files[@]}"; do
  "$format" --dry-run --Werror "$f" > /dev/null 2>&1 || differ+=("$f")
done

version=$("$format" --version | grep -o 'version [0-9.]*' || true)
if [ "${#differ[@]}" -gt 0 ]; then
  echo "check_format: ${#differ[@]} of ${#files[@]} files differ from .clang-format ($version):"
  printf '  %s\n' "${differ[@]}"
  exit 1
fi
echo "check_format: ${#files[@]} files formatted ($version)"
