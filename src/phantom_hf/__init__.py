"""phantom-hf: the Phantom family of vision-language models, native to transformers and the Hugging Face Hub.

Importing the package registers Phantom with the Auto classes (no `trust_remote_code` needed).
`PhantomPOTrainer`/`PhantomPOConfig` need the `train` extra (trl, peft, datasets, accelerate) and are imported on
first use.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The `phantom-hf` command's entry module (outside this package): while it runs, importing the package leaves
# the registration (which loads torch) to the command, so that `--help` needs no torch and the command can set
# torch's OpenMP environment first (phantom_hf.threads).
LAUNCHER_MODULE = "phantom_hf_launch"

# Public names -> the module that defines them, imported on first use.
_EXPORTS = {
    "PhantomCache": ".modeling",
    "PhantomConfig": ".modeling",
    "PhantomForConditionalGeneration": ".modeling",
    "PhantomModel": ".modeling",
    "PhantomStaticCache": ".modeling",
    "PhantomProcessor": ".modeling.processing_phantom",
    "PhantomPOConfig": ".trainer",
    "PhantomPOTrainer": ".trainer",
}

if TYPE_CHECKING:
    from .modeling import PhantomCache, PhantomConfig, PhantomForConditionalGeneration, PhantomModel, PhantomStaticCache
    from .modeling.processing_phantom import PhantomProcessor
    from .trainer import PhantomPOConfig, PhantomPOTrainer


def register_auto_classes() -> None:
    """Register Phantom with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    from .modeling import PhantomConfig, PhantomForConditionalGeneration
    from .modeling.processing_phantom import PhantomProcessor

    AutoConfig.register(PhantomConfig.model_type, PhantomConfig, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        auto_class.register(PhantomConfig, PhantomForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(PhantomConfig, PhantomProcessor, exist_ok=True)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'phantom_hf' has no attribute {name!r}")


if not getattr(sys.modules.get(LAUNCHER_MODULE), "running", False):
    register_auto_classes()

__all__ = [
    "PhantomCache",
    "PhantomConfig",
    "PhantomForConditionalGeneration",
    "PhantomModel",
    "PhantomPOConfig",
    "PhantomPOTrainer",
    "PhantomProcessor",
    "PhantomStaticCache",
    "__version__",
    "register_auto_classes",
]
