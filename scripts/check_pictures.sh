#!/usr/bin/env bash
# Renders the SVG pictures that jane_demo and train_heads write with headless Chromium, as a
# user's browser shows them, and checks each image with picture_check: the declared size, not
# blank, every head's colour present.
#
#   scripts/check_pictures.sh BUILD_DIR
#
# Needs Debian's chromium and netpbm (pngtopnm). Exit status 77 when they are missing (ctest
# reports the test as skipped); the CI installs them, so there it runs.
set -euo pipefail
build=${1:?usage: check_pictures.sh BUILD_DIR}
for tool in chromium pngtopnm; do
  if ! command -v "$tool" > /dev/null; then
    echo "check_pictures: $tool is not installed (Debian packages chromium, netpbm): skipped"
    exit 77
  fi
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$build/examples/jane_demo" "$work" > /dev/null
"$build/examples/train_heads" "$work" > /dev/null
count=0
for svg in "$work"/*.svg; do
  # The root element's width and height (whole pixels, see mha/plot.hpp).
  width=$(grep -o -m1 '<svg [^>]*' "$svg" | grep -o ' width="[0-9]*' | grep -o '[0-9]*$')
  height=$(grep -o -m1 '<svg [^>]*' "$svg" | grep -o ' height="[0-9]*' | grep -o '[0-9]*$')
  # The heads' colours: legend swatches (lines) and colour bars (heat maps).
  mapfile -t colours < <(grep -o 'stop-color="#[0-9a-f]\{6\}"\|class="legend"><rect [^>]*fill="#[0-9a-f]\{6\}"' "$svg" |
                         grep -o '#[0-9a-f]\{6\}' | sort -u)
  png="$work/$(basename "$svg" .svg).png"
  # Flags: no sandbox (root in CI), no GPU, and no background network traffic (the machine has
  # no network); a fresh profile each time.
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --hide-scrollbars --force-device-scale-factor=1 \
    --window-size="$width,$height" --screenshot="$png" "file://$svg" > /dev/null 2>&1
  pngtopnm "$png" > "$work/image.ppm"
  "$build/tests/picture_check" "$work/image.ppm" "$width" "$height" "${colours[@]}"
  count=$((count + 1))
done
[ "$count" -ge 4 ] || { echo "check_pictures: expected 4 pictures from jane_demo and train_heads, got $count"; exit 1; }
