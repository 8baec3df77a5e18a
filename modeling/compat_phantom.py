"""What differs between the transformers releases the Phantom model code supports, in one place.

Every name here bridges one change and says which release made it; the rest of the model code uses these
names instead of testing for a release itself. Hub remote code: imports only transformers.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import processing_utils
from transformers.modeling_outputs import CausalLMOutputWithPast


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a transformers version string ("5.23.0", "5.26.0.dev0")."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(character for character in minor if character.isdigit()))


# transformers 5.24 renamed `past_key_values` to `cache`: the field of every `ModelOutput`, the keyword of every
# model's `forward` and attention module, and what `generate` passes. Before: `past_key_values`.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# transformers 5.23 places the assistant-token mask of a processor's chat template after the image placeholders
# are expanded; before, the mask is placed by the unexpanded text. Read from the release number (public), not from
# the presence of the private method that does it.
ASSISTANT_MASK_FOLLOWS_EXPANSION = _release(transformers.__version__) >= (5, 23)

# transformers 5.23 marks the user text of a rendered chat (`sanitize_control_tokens`) with `_MARKED_RE` spans;
# before, there are no marks to skip.
_MARKED_RE = getattr(processing_utils, "_MARKED_RE", None)


def take_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache a caller passed under the current name or the one before 5.24 (both names are accepted on every
    release, so code written for either works); passing two caches is an error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the name the running release uses, for model calls and output classes."""
    return {CACHE_NAME: cache}


def cache_of(output: Any) -> Any:
    """The cache a model output holds, read under the running release's field name (no deprecation warning)."""
    return getattr(output, CACHE_NAME)


def checkpointing_field(training_arguments: Any) -> str:
    """The `TrainingArguments` field that turns activation checkpointing on: `activation_checkpointing` since
    transformers 5.23 (the old `gradient_checkpointing` still works there, with a deprecation warning),
    `gradient_checkpointing` before."""
    return "activation_checkpointing" if hasattr(training_arguments, "activation_checkpointing") else "gradient_checkpointing"


def unmarked(text: str) -> str:
    """`text` without the spans `sanitize_control_tokens` marked as user text (5.23+; unchanged before)."""
    return _MARKED_RE.sub("", text) if _MARKED_RE is not None else text


__all__ = [
    "ASSISTANT_MASK_FOLLOWS_EXPANSION",
    "CACHE_NAME",
    "cache_kwargs",
    "cache_of",
    "checkpointing_field",
    "take_cache",
    "unmarked",
]
