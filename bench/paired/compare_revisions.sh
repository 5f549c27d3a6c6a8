#!/usr/bin/env bash
# Times the attention core of two revisions of this library in one program, calls alternating
# (paired_attention.cpp), to measure changes of a percent or two that separate runs on a shared
# machine cannot resolve.
#
#   bench/paired/compare_revisions.sh BASE NEW [paired_attention options]
#
# BASE and NEW are git revisions (anything `git rev-parse` takes) or "." for the working tree's
# include/ as it is now. Options go to paired_attention (see there), for example
#   bench/paired/compare_revisions.sh HEAD~1 HEAD --precision bf16 --length 512 --mask causal
# Environment: CXX (g++), CXXFLAGS (-O3 -DNDEBUG -march=native), EIGEN_INCLUDE_DIR
# (/usr/include/eigen3), OMP_NUM_THREADS (1: one thread unless set).
#
# Where the linker puts a kernel moves its speed by a percent or two on its own, so the program
# is linked twice, with the two revisions' objects in either order, and both are run. The result
# is the geometric mean of their two medians of time(BASE) / time(NEW): above 1, NEW is faster.
# `compare_revisions.sh HEAD HEAD` shows how far from 1 the method reads when nothing changed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [ $# -lt 2 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
base=$1 new=$2
shift 2

cxx=${CXX:-g++}
read -r -a flags <<< "${CXXFLAGS:--O3 -DNDEBUG -march=native}"
flags=(-std=c++17 "${flags[@]}" -fopenmp -isystem "${EIGEN_INCLUDE_DIR:-/usr/include/eigen3}" -I"$here")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The headers of revision $1 into $2/include.
headers_of() {
  mkdir -p "$2"
  if [ "$1" = . ]; then
    cp -r "$repo/include" "$2/"
  else
    git -C "$repo" rev-parse --verify --quiet "$1^{commit}" > /dev/null ||
      { echo "compare_revisions.sh: '$1' is not a revision of $repo" >&2; exit 2; }
    git -C "$repo" archive "$1" include | tar -x -C "$2"
  fi
}
headers_of "$base" "$work/base"
headers_of "$new" "$work/new"

echo "building: base = $base, new = $new ($cxx ${flags[*]})"
for slot in base new; do
  "$cxx" "${flags[@]}" -I"$work/$slot/include" -DMHA_PAIRED_REVISION="$slot" \
    -c "$here/revision.cpp" -o "$work/$slot.o" &
  eval "pid_$slot=$!"
done
"$cxx" "${flags[@]}" -c "$here/paired_attention.cpp" -o "$work/driver.o"
wait "$pid_base"
wait "$pid_new"
"$cxx" "${flags[@]}" "$work/driver.o" "$work/base.o" "$work/new.o" -o "$work/base_first"
"$cxx" "${flags[@]}" "$work/driver.o" "$work/new.o" "$work/base.o" -o "$work/new_first"

medians=()
for program in base_first new_first; do
  echo
  echo "== linked with the ${program%%_first} revision's object first"
  "$work/$program" "$@" | tee "$work/$program.txt"
  medians+=("$(awk '/^median base\/new/ { print $3 }' "$work/$program.txt")")
done
echo
awk -v a="${medians[0]}" -v b="${medians[1]}" -v base="$base" -v new="$new" 'BEGIN {
  printf "time(%s) / time(%s): %.4f and %.4f by link order, geometric mean %.4f\n",
         base, new, a, b, sqrt(a * b)
  print "(above 1: the new revision is faster; an A/A run, BASE = NEW, shows the method'"'"'s noise)"
}'
