"""Weight quantization of Phantom models: which modules stay in the compute dtype, and the quantization config that
says so (`from_pretrained(..., quantization_config=...)`: bitsandbytes 8/4-bit, torchao, and every config with a
module skip list).

Hub remote code: imports only transformers and its sibling files.
"""

from __future__ import annotations

import copy
from typing import Any

from .configuration_phantom import PHANTOM_MODULE_NAMES

# Regexes matched from the start of a module or parameter name, as transformers' quantizers read their skip lists
# (5.11 and 5.24 alike). The Phantom modules are tiny (1.2M parameters at 0.5B) and the fused MHCA reads
# `linear_q.weight` as a plain tensor, so they are always kept.
PHANTOM_MODULES_NOT_QUANTIZED = tuple(rf".*\.{name}" for name in PHANTOM_MODULE_NAMES)
# The default list: the vision tower, projector and `lm_head` are kept too unless the config names its own list (the
# published loader kept the projector and `lm_head`, and quantized the vision tower).
MODULES_NOT_QUANTIZED = PHANTOM_MODULES_NOT_QUANTIZED + (
    r"(?:model\.)?vision_tower",
    r"(?:model\.)?multi_modal_projector",
    "lm_head",
)
# The skip-list field of each family of quantization configs: bitsandbytes', then torchao's and the others'.
_SKIP_LIST_FIELDS = ("llm_int8_skip_modules", "modules_to_not_convert")


def keep_modules_unquantized(
    quantization_config: Any,
    default: tuple[str, ...] = MODULES_NOT_QUANTIZED,
    always: tuple[str, ...] = PHANTOM_MODULES_NOT_QUANTIZED,
) -> Any:
    """A copy of `quantization_config` (a config object or its dict) whose module skip list keeps modules unquantized:
    all of `default` when the config names none, else the config's list plus `always`. Configs without a skip list
    are returned as they are."""
    if isinstance(quantization_config, dict):
        from transformers.quantizers import AutoQuantizationConfig

        quantization_config = AutoQuantizationConfig.from_dict(quantization_config)
    field = next((name for name in _SKIP_LIST_FIELDS if hasattr(quantization_config, name)), None)
    if field is None:
        return quantization_config
    skip = getattr(quantization_config, field)
    kept = list(default) if skip is None else list(skip)
    kept += [pattern for pattern in always if pattern not in kept]
    quantization_config = copy.deepcopy(quantization_config)
    setattr(quantization_config, field, kept)
    return quantization_config


__all__ = ["MODULES_NOT_QUANTIZED", "PHANTOM_MODULES_NOT_QUANTIZED", "keep_modules_unquantized"]
