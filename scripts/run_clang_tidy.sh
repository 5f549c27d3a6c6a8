#!/usr/bin/env bash
# Runs clang-tidy, configured by .clang-tidy at the repository root, on every header under
# include/mha (subfolders included), each through a generated translation unit that includes
# it alone. Exits non-zero on any finding in a header of mha or any compile error. The safetensors header is skipped when nlohmann/json.hpp cannot be found.
#
#   scripts/run_clang_tidy.sh [INCLUDE_DIR]
#
# INCLUDE_DIR (or $MHA_INCLUDE_DIR): the directory that holds mha/; default include/ here.
# Environment: CLANG_TIDY (default clang-tidy); MHA_TIDY_JOBS (parallel runs, default: cores);
# MHA_TIDY_STD (default c++17); EIGEN3_INCLUDE_DIR (default from pkg-config eigen3, else
# /usr/include/eigen3); MHA_TIDY_FLAGS (more compiler flags, e.g. -I for nlohmann_json).
# The headers are compiled with -fopenmp (as the build does by default) when omp.h is found.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
include_dir=$(cd "${1:-${MHA_INCLUDE_DIR:-$root/include}}" && pwd)
tidy=${CLANG_TIDY:-clang-tidy}
parallel=${MHA_TIDY_JOBS:-$(nproc)}
eigen=${EIGEN3_INCLUDE_DIR:-}
if [ -z "$eigen" ]; then
  eigen=$(pkg-config --cflags-only-I eigen3 2>/dev/null | sed 's/^ *-I//; s/ .*//' || true)
  eigen=${eigen:-/usr/include/eigen3}
fi

if ! command -v "$tidy" > /dev/null; then
  echo "run_clang_tidy: $tidy not found (Debian: apt-get install clang-tidy)" >&2
  exit 2
fi
if [ ! -d "$include_dir/mha" ]; then
  echo "run_clang_tidy: no mha/ under $include_dir" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# shellcheck disable=SC2206  # MHA_TIDY_FLAGS is split on purpose
flags=(-std="${MHA_TIDY_STD:-c++17}" -I"$include_dir" -isystem "$eigen" ${MHA_TIDY_FLAGS:-})

# Whether a header compiles with the given extra flags (clang-tidy refuses to run with no check
# at all, so one that only looks at #include lines).
compiles() {
  local header=$1; shift
  printf '#include <%s>\n' "$header" > "$work/probe.cpp"
  "$tidy" --checks='-*,readability-duplicate-include' --quiet "$work/probe.cpp" -- \
    "${flags[@]}" "$@" > /dev/null 2>&1
}
if compiles omp.h -fopenmp; then
  flags+=(-fopenmp)
else
  echo "run_clang_tidy: no omp.h for clang, checking the headers without OpenMP"
fi
have_json=0
compiles nlohmann/json.hpp && have_json=1

mapfile -t headers < <(cd "$include_dir" && find mha -name '*.hpp' | LC_ALL=C sort)
names=()
for header in "${headers[@]}"; do
  if [[ $header == *safetensors* ]] && [ "$have_json" -eq 0 ]; then
    echo "run_clang_tidy: skipping $header (nlohmann/json.hpp not found)"
    continue
  fi
  names+=("$header")
done
if [ "${#names[@]}" -eq 0 ]; then
  echo "run_clang_tidy: no headers under $include_dir/mha" >&2
  exit 2
fi

# Findings anywhere under INCLUDE_DIR/mha count (a template may be instantiated only by another
# header); the same finding from several translation units is shown once.
# shellcheck disable=SC2016  # a sed script
filter=$(printf '%s' "$include_dir/mha/" | sed 's/[].[*^$()+?{}|\\]/\\&/g')

# check HEADER TU: runs clang-tidy on TU, which includes HEADER alone; TU.log is empty when clean.
check() {
  local header=$1 tu=$2
  printf '#include <%s>\n' "$header" > "$tu"
  "$tidy" --quiet --config-file="$root/.clang-tidy" --header-filter="$filter" "$tu" -- \
    "${flags[@]}" > "$tu.out" 2>&1 || echo "clang-tidy exit status $?" >> "$tu.out"
  # Findings in Eigen or the standard library are counted in "N warnings generated." but not
  # shown: drop that line.
  grep -vE '^[0-9]+ (warnings?|errors?)( and [0-9]+ errors?)? generated\.$' "$tu.out" \
    > "$tu.log" || true
}
tus=()
for header in "${names[@]}"; do
  tu=$work/${header//[\/.]/_}.cpp
  tus+=("$tu")
  check "$header" "$tu" &
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
done
wait

failed=() logs=()
for i in "${!tus[@]}"; do
  if [ -s "${tus[$i]}.log" ]; then
    echo "FAIL ${names[$i]}"
    failed+=("${names[$i]}") logs+=("${tus[$i]}.log")
  else
    echo "ok   ${names[$i]}"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo
  # Each diagnostic with its notes and source lines, once.
  # shellcheck disable=SC2016  # an awk program
  awk 'FNR == 1 { show = 1 }
       /^Error while processing |^clang-tidy exit status / { next }
       /: (warning|error): / { show = !($0 in seen); seen[$0] = 1 }
       show' "${logs[@]}" | sed "s|$work/||"
  echo "run_clang_tidy: findings with ${#failed[@]} of ${#tus[@]} headers" >&2
  exit 1
fi
echo "run_clang_tidy: ${#tus[@]} headers clean ($("$tidy" --version | grep -o 'version [0-9.]*'))"
