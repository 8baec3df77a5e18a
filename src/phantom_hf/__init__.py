"""phantom-hf: the Phantom family of vision-language models, native to transformers and the Hugging Face Hub."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from .modeling import PhantomCache, PhantomConfig, PhantomForConditionalGeneration, PhantomModel

__version__ = "0.1.0"

# With phantom_hf imported, the Auto classes know Phantom without trust_remote_code.
AutoConfig.register(PhantomConfig.model_type, PhantomConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(PhantomConfig, PhantomForConditionalGeneration, exist_ok=True)

__all__ = ["PhantomCache", "PhantomConfig", "PhantomForConditionalGeneration", "PhantomModel", "__version__"]
