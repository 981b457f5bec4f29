#!/usr/bin/env bash
# The decoder benchmark's runtime peers, installed into the current Python (the main env):
# onnxruntime-genai 0.18 (its model builder needs transformers 5, and it asks only onnxruntime >= 1.31,
# which the main env's 1.32 satisfies) and CTranslate2 4.x. Neither is needed by the tests or by CI;
# `attnfuse bench --model llama` lists a peer that is missing as "not installed" and goes on.
# Optimum needs transformers < 4.58: it gets a venv of its own (benchmarks/peers/optimum_venv.sh).
set -euo pipefail
python -m pip install "onnxruntime-genai==0.18.*" "ctranslate2==4.*"
python - <<'PY'
import ctranslate2, onnxruntime, onnxruntime_genai
print(f"onnxruntime-genai {onnxruntime_genai.__version__}, ctranslate2 {ctranslate2.__version__}, "
      f"onnxruntime {onnxruntime.__version__}")
PY
