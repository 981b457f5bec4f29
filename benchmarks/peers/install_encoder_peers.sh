#!/usr/bin/env bash
# The encoder benchmark's runtime peers (OpenVINO, CTranslate2), installed into the current Python
# through attnfuse's `bench` extra. The torch pin keeps pip on the CPU build that is already there
# (a loose torch requirement would pull a CUDA build). Neither the tests nor CI need these:
# `attnfuse bench` lists a peer that is missing as "not installed" and goes on.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install torch==2.13.0 -e ".[bench]"
python - <<'PY'
import ctranslate2, openvino
print(f"openvino {openvino.__version__}, ctranslate2 {ctranslate2.__version__}")
PY
