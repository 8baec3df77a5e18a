"""phantom-hf: the Phantom family of vision-language models, native to transformers and the Hugging Face Hub.

Importing the package registers Phantom with the Auto classes (no `trust_remote_code` needed).
`PhantomPOTrainer`/`PhantomPOConfig` need the `train` extra (trl, peft, datasets, accelerate) and are imported on
first use.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .modeling import PhantomCache, PhantomConfig, PhantomForConditionalGeneration, PhantomModel, PhantomStaticCache
from .modeling.processing_phantom import PhantomProcessor

__version__ = "0.1.0"

AutoConfig.register(PhantomConfig.model_type, PhantomConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(PhantomConfig, PhantomForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PhantomConfig, PhantomProcessor, exist_ok=True)

_TRAINER_EXPORTS = ("PhantomPOConfig", "PhantomPOTrainer")


def __getattr__(name: str) -> Any:
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'phantom_hf' has no attribute {name!r}")


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
]
