"""Tiny configurations for tests, examples and the offline demo: same structure as the published
models (GQA decoder, InternViT with layer scale), small enough for a CPU."""

from __future__ import annotations

from typing import Any

from transformers import (
    InternVLVisionConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from .modeling import PhantomConfig


# Token ids of the backbones' own defaults that fall outside a tiny vocabulary (Phi-3: 32000) are moved inside it.
_TINY_SPECIAL_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
TEXT_CONFIG_CLASSES = {
    "qwen2": Qwen2Config,
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen3": Qwen3Config,
    "phi3": Phi3Config,
}


def tiny_text_config(model_type: str = "qwen2", **overrides: Any) -> PretrainedConfig:
    """A 2-layer GQA decoder (4 query heads, 2 key/value heads, head_dim 16 by default) of any backbone Phantom
    Dimension supports: "qwen2" (q/k/v biases), "llama", "mistral", "qwen3" (per-head q/k norms), "phi3" (packed qkv)."""
    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if model_type == "phi3":
        values.update(_TINY_SPECIAL_TOKENS)
    values.update(overrides)
    if model_type == "qwen3":  # Qwen3's default head_dim is 128 whatever the hidden size
        values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    if model_type not in TEXT_CONFIG_CLASSES:
        raise ValueError(f"tiny_text_config knows {sorted(TEXT_CONFIG_CLASSES)}, got {model_type!r}")
    return TEXT_CONFIG_CLASSES[model_type](**values)


def tiny_vision_config(**overrides: Any) -> InternVLVisionConfig:
    """A 1-layer InternViT on 28x28 tiles of 7x7 patches: 16 patches, 4 tokens per tile after pixel shuffle."""
    values = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[28, 28],
        patch_size=[7, 7],
    )
    values.update(overrides)
    return InternVLVisionConfig(**values)


def tiny_phantom_config(image_token_id: int = 5, **overrides: Any) -> PhantomConfig:
    """A tiny `PhantomConfig` built from `tiny_text_config` and `tiny_vision_config`."""
    text_overrides = overrides.pop("text_config", {})
    vision_overrides = overrides.pop("vision_config", {})
    return PhantomConfig(
        text_config=tiny_text_config(**text_overrides),
        vision_config=tiny_vision_config(**vision_overrides),
        image_token_id=image_token_id,
        **overrides,
    )
