#!/usr/bin/env bash
# The GPU smoke test (bench/gpu_smoke.py) as a GPU session runs it: from the repository root, on a machine with no
# network. unisd runs from this source tree (nothing is pip-installed: the cases need only torch, transformers,
# peft, safetensors, click, tqdm, numpy, scipy, scikit-learn, pyyaml and matplotlib), and every file it writes
# goes under $OUT: summary.txt, gpu-smoke.json, log.txt.
#   OUT=/path/to/folder bench/gpu_smoke.sh [--budget-s 300]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the Python budget, and a hard stop 30 s after it should anything hang past its own timeouts
exec timeout --kill-after 10 "${SMOKE_TIMEOUT_S:-330}" python3 -m bench gpu_smoke --out "$OUT" "$@"
