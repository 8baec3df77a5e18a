"""The four published Phantom sizes (PHANTOM_SPEC section 5) as plain data.

Hub remote code: imports nothing but the standard library. `PhantomConfig.from_preset(name)` turns an entry into
a config. Every size uses InternViT-300M-448px, the "phantom" projector (pixel shuffle 0.5, LayerNorm, Linear,
GELU, Linear) and the InternVL2 tokenizer of its language model, which adds `<img>`, `</img>`, `<IMG_CONTEXT>`
(and six grounding tokens) after the backbone's own special tokens; `image_token_id` is that tokenizer's id of
`<IMG_CONTEXT>`, a default that conversion replaces by the id found in the checkpoint's tokenizer.

InternLM2 backbones are Llama decoders (`wqkv` split at conversion, spec section 5); their `rope_scaling`
"dynamic" (factor 2) is transformers' dynamic-NTK rope, the same scaling InternLM2 implements.
"""

from __future__ import annotations

import copy
from typing import Any

# InternViT-300M-448px as transformers' `InternVLVisionConfig`: pre-norm LayerNorm blocks with layer scale, qkv
# bias, no qk-norm, no final norm (`use_mean_pooling=True` makes the final norm an identity, as transformers'
# InternVL conversion does), a CLS token and absolute position embeddings.
INTERNVIT_300M_448PX: dict[str, Any] = {
    "model_type": "internvl_vision",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "num_channels": 3,
    "hidden_act": "gelu",
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "attention_bias": True,
    "use_qk_norm": False,
    "layer_scale_init_value": 0.1,
    "use_absolute_position_embeddings": True,
    "use_mean_pooling": True,
}

# Chat formats of the published models (spec section 5), by name.
CHAT_FORMATS: dict[str, dict[str, str]] = {
    "chatml": {"user_start": "<|im_start|>user\n", "turn_end": "<|im_end|>", "assistant_start": "<|im_start|>assistant\n"},
    "phi3": {"user_start": "<|user|>\n", "turn_end": "<|end|>", "assistant_start": "<|assistant|>\n"},
}

PRESETS: dict[str, dict[str, Any]] = {
    "phantom-0.5b": {
        "language_model": "Qwen/Qwen2-0.5B-Instruct",
        "chat_format": "chatml",
        "image_token_id": 151648,
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 151655,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
    },
    "phantom-1.8b": {
        "language_model": "internlm/internlm2-chat-1_8b",
        "chat_format": "chatml",
        "image_token_id": 92546,
        "text_config": {
            "model_type": "llama",
            "vocab_size": 92553,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "rms_norm_eps": 1e-5,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
    },
    "phantom-3.8b": {
        "language_model": "microsoft/Phi-3-mini-4k-instruct",
        "chat_format": "phi3",
        "image_token_id": 32013,
        "text_config": {
            "model_type": "phi3",
            "vocab_size": 32020,
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "sliding_window": 2047,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 32000,
            "pad_token_id": 32000,
        },
    },
    "phantom-7b": {
        "language_model": "internlm/internlm2_5-7b-chat",
        "chat_format": "chatml",
        "image_token_id": 92546,
        "text_config": {
            "model_type": "llama",
            "vocab_size": 92553,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "rms_norm_eps": 1e-5,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
    },
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset_config_kwargs(name: str) -> dict[str, Any]:
    """`PhantomConfig` keyword arguments of preset `name` (fresh copies: callers may modify them)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Phantom preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    preset = PRESETS[name]
    return {
        "text_config": copy.deepcopy(preset["text_config"]),
        "vision_config": copy.deepcopy(INTERNVIT_300M_448PX),
        "image_token_id": preset["image_token_id"],
        "downsample_ratio": 0.5,
        "projector_type": "phantom",
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }


def preset_chat_format(name: str) -> str:
    """Name of the chat format ("chatml" or "phi3") preset `name` was trained with."""
    if name not in PRESETS:
        raise ValueError(f"unknown Phantom preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    return PRESETS[name]["chat_format"]


__all__ = ["CHAT_FORMATS", "INTERNVIT_300M_448PX", "PRESETS", "PRESET_NAMES", "preset_chat_format", "preset_config_kwargs"]
