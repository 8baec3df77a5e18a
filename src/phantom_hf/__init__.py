"""phantom-hf: the Phantom family of vision-language models, native to transformers and the Hugging Face Hub.

Importing the package registers Phantom with the Auto classes (no `trust_remote_code` needed) and makes
`save_pretrained` of Phantom models write a rendered model card. `PhantomPOTrainer`/`PhantomPOConfig` need the
`train` extra (trl, peft, datasets, accelerate) and are imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .hub import CARD_NAME, write_model_card
from .modeling import PhantomCache, PhantomConfig, PhantomForConditionalGeneration, PhantomModel, PhantomStaticCache
from .modeling.modeling_phantom import SAVE_HOOKS
from .modeling.processing_phantom import PhantomProcessor

__version__ = "0.1.0"

AutoConfig.register(PhantomConfig.model_type, PhantomConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(PhantomConfig, PhantomForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PhantomConfig, PhantomProcessor, exist_ok=True)


def _write_card_unless_present(folder: Path, model: Any) -> None:
    """Give a saved folder a model card; a card already there (e.g. from training, with results) is kept."""
    if not (folder / CARD_NAME).exists():
        write_model_card(folder, model)


if _write_card_unless_present not in SAVE_HOOKS:
    SAVE_HOOKS.append(_write_card_unless_present)

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
