#!/usr/bin/env bash
# On a CUDA machine, from anywhere: bash benchmarks/gpu_check.sh [benchmarks/gpu_check.py flags]
# Installs phantom-hf from this checkout (editable, without dependencies: torch and transformers stay as they are),
# then runs benchmarks/gpu_check.py, which installs flash-attn, bitsandbytes and vLLM where wheels exist (put wheels
# in .whl/ when the machine has no index) and prints the table. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$python" -c "import phantom_hf.modeling" 2>/dev/null; then
    "$python" -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: phantom-hf does not install here"; exit 2; }
fi
exec "$python" benchmarks/gpu_check.py "$@"
