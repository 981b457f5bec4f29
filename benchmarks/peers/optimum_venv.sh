#!/usr/bin/env bash
# A venv for Hugging Face Optimum (optimum-onnx 0.1.0 caps transformers below 4.58, attnfuse's
# env has transformers 5), used by benchmarks/peers/optimum_generate.py and
# benchmarks/optimum_coverage.py. Torch first, pinned, so that pip takes the CPU build instead of
# pulling CUDA packages for optimum's loose torch requirement. Never run by CI or the tests.
#
#   bash benchmarks/peers/optimum_venv.sh     # prints the venv's python at the end
set -euo pipefail
VENV="${ATTNFUSE_VENVS:-$HOME/.cache/attnfuse/venvs}/optimum"
python -m venv "$VENV"
"$VENV/bin/python" -m pip install torch==2.13.0
"$VENV/bin/python" -m pip install "optimum-onnx[onnxruntime]==0.1.0"
"$VENV/bin/python" - <<'PY'
import onnxruntime, optimum.onnxruntime, torch, transformers
print(f"optimum venv: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"onnxruntime {onnxruntime.__version__}")
PY
echo "$VENV/bin/python"
