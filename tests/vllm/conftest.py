"""The vLLM tests run in their own environment (vLLM pins its own torch and transformers): `.ci/vllm-pass.sh`
builds it and runs them. Where vllm is not installed (the normal test passes) each module here is skipped with the
reason in pytest's summary (`helpers.import_vllm`); with PHANTOM_HF_REQUIRE_VLLM=1 (set by .ci/vllm-pass.sh) a
missing vllm fails them instead.

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with a 1 GiB CPU KV cache, in float32 (eagerly, but
for the tests of vLLM's compiled path)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
