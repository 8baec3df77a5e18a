"""Phantom model code, uploaded as Hub remote code next to every saved model (imports only torch and
transformers). Installed as `phantom_hf.modeling`."""

from .cache_phantom import PhantomCache, PhantomStaticCache
from .configuration_phantom import PhantomConfig
from .modeling_phantom import PhantomForConditionalGeneration, PhantomModel, PhantomPreTrainedModel

__all__ = [
    "PhantomCache",
    "PhantomConfig",
    "PhantomForConditionalGeneration",
    "PhantomModel",
    "PhantomPreTrainedModel",
    "PhantomStaticCache",
]
