#!/usr/bin/env bash
# On a CUDA machine, from anywhere: bash benchmarks/gpu_check.sh [benchmarks/gpu_check.py flags]
# Installs phantom-hf from this checkout (editable, without dependencies: torch and transformers stay as they are;
# where no build backend is installed, the checkout's package folders are linked as pyproject.toml maps them), then
# runs benchmarks/gpu_check.py, which installs flash-attn, bitsandbytes and vLLM where wheels exist (put wheels in
# .whl/ when the machine has no index) and prints the table. A transformers wheel in .whl/ goes in front of the
# installed release, without dependencies (the compiled decode needs one whose static cache can crop: 5.24 does,
# 5.17 does not). PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
front="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")"
for wheel in .whl/transformers-*.whl; do
    [ -f "$wheel" ] || continue
    "$python" -m pip install -q --no-index --no-deps --target "$front" "$wheel" || { echo "gpu_check: $wheel does not install"; exit 2; }
    export PYTHONPATH="$front${PYTHONPATH:+:$PYTHONPATH}"
done
if ! "$python" -c "import phantom_hf.modeling" 2>/dev/null; then
    if ! "$python" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
        echo "gpu_check: no editable install here (no build backend?): linking the checkout's package folders"
        mkdir -p "$front/phantom_hf" && cp -rs "$PWD/src/phantom_hf/." "$front/phantom_hf/" \
            && ln -s "$PWD/modeling" "$front/phantom_hf/modeling" && ln -s "$PWD/hub_cards" "$front/phantom_hf/hub_cards" \
            && ln -s "$PWD/src/phantom_hf_launch.py" "$front/phantom_hf_launch.py" || { echo "gpu_check: phantom-hf does not install here"; exit 2; }
        export PYTHONPATH="$front${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$python" -c "import phantom_hf.modeling" || { echo "gpu_check: phantom_hf does not import"; exit 2; }
fi
"$python" -c "import torch, transformers; print(f'gpu_check: torch {torch.__version__}, transformers {transformers.__version__}')"
exec "$python" benchmarks/gpu_check.py "$@"
