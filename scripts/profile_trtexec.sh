#!/usr/bin/env bash
# Build and profile an artifact's engines with trtexec, then print a latency table.
#   scripts/profile_trtexec.sh ARTIFACT_DIR
# Needs trtexec on PATH (Jetson: /usr/src/tensorrt/bin/trtexec; or set TRTEXEC=...) and apet installed.
# BUILD=1 (default) builds engines with trtexec into ARTIFACT_DIR/trtexec/ and profiles those; BUILD=0 profiles
# the engines apet-build wrote (never overwritten either way). The report groups per-layer time by stage.
set -euo pipefail
dir="${1:?usage: scripts/profile_trtexec.sh ARTIFACT_DIR}"
trtexec_bin="${TRTEXEC:-trtexec}"
if ! command -v "$trtexec_bin" >/dev/null 2>&1; then
  echo "error: trtexec not found — put it on PATH or set TRTEXEC=/path/to/trtexec (Jetson: /usr/src/tensorrt/bin/trtexec)" >&2
  exit 5
fi
[ -f "$dir/trtexec.sh" ] || apet-build "$dir" --emit-trtexec
TRTEXEC="$trtexec_bin" bash "$dir/trtexec.sh"
python3 -m apet.engines.trtexec report "$dir" | tee "$dir/trtexec/report.md"
