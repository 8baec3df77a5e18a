"""The four published Phantom sizes (paper Sec. 4) as plain data.

Hub remote code: imports nothing but the standard library. `PhantomConfig.from_preset(name)` turns an entry into
a config. Every size uses InternViT-300M-448px, the "phantom" projector (pixel shuffle 0.5, LayerNorm, Linear,
GELU, Linear) and the InternVL2 tokenizer of its language model, which adds `<img>`, `</img>`, `<IMG_CONTEXT>`
(and six grounding tokens) after the backbone's own special tokens; `image_token_id` is that tokenizer's id of
`<IMG_CONTEXT>`, a default that conversion replaces by the id found in the checkpoint's tokenizer.

InternLM2 backbones are Llama decoders (`wqkv` split at conversion); their `rope_scaling`
"dynamic" (factor 2) is transformers' dynamic-NTK rope, the same scaling InternLM2 implements.

`BASELINE_PRESETS` holds the other system of the project's sources, Xmodel-VLM (arXiv 2405.09215): the LLaVA-1.5
paradigm with CLIP ViT-L/14-336, the XDP projector and Xmodel-LM 1.1B, without Phantom Dimension. Its fields come
from the public XmodelVLM / XmodelLM repositories (`XModelConfig` "xl": 24 layers, 32 heads, 4 key/value heads,
hidden 2048, intermediate find_multiple(8 * 2048 / 3, 256) = 5632, vocabulary 32000, rotary base 10000, RMSNorm
eps 1e-5, untied head) and the paper (context 4096). `chat_format` names a key of `processing_phantom.CHAT_FORMATS` (`chat_format_for(preset)` reads it).
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

# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336) as transformers' `CLIPVisionConfig`.
CLIP_VIT_L_14_336: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
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
            # The published config says 2047 and its attention sees 2047 tokens before each token and the token
            # itself; transformers' sliding_window counts the token itself (phantom_hf.convert.published_sliding_window).
            "sliding_window": 2048,
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

BASELINE_PRESETS: dict[str, dict[str, Any]] = {
    "xmodel-vlm-1.1b": {
        "language_model": "XiaoduoAILab/XmodelLM",
        # Vicuna v1 (`conv_templates["v1"]`, the `--version v1` of Xmodel-VLM's training scripts).
        "chat_format": "vicuna_v1",
        # Xmodel-LM's tokenizer has no image token (LLaVA splices features in at id -200); conversion appends
        # <IMG_CONTEXT> after its 32000 tokens, and the embedding grows by that one row.
        "image_token_id": 32000,
        "vision_config": CLIP_VIT_L_14_336,
        "projector_type": "xdp",
        "projector_group_size": 4,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama",
            "vocab_size": 32001,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
    },
}
BASELINE_PRESET_NAMES: tuple[str, ...] = tuple(BASELINE_PRESETS)
ALL_PRESET_NAMES: tuple[str, ...] = PRESET_NAMES + BASELINE_PRESET_NAMES


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown Phantom preset {name!r}; known presets: {', '.join(ALL_PRESET_NAMES)}")


def preset_config_kwargs(name: str) -> dict[str, Any]:
    """`PhantomConfig` keyword arguments of preset `name` (fresh copies: callers may modify them)."""
    if name in BASELINE_PRESETS:
        preset = BASELINE_PRESETS[name]
        keys = ("image_token_id", "projector_type", "projector_group_size", "vision_feature_layer", "vision_feature_select_strategy")
        return {
            "text_config": copy.deepcopy(preset["text_config"]),
            "vision_config": copy.deepcopy(preset["vision_config"]),
            **{key: preset[key] for key in keys},
            "phantom_dimension": False,
        }
    if name not in PRESETS:
        raise _unknown(name)
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


__all__ = [
    "ALL_PRESET_NAMES",
    "BASELINE_PRESETS",
    "BASELINE_PRESET_NAMES",
    "CLIP_VIT_L_14_336",
    "INTERNVIT_300M_448PX",
    "PRESETS",
    "PRESET_NAMES",
    "preset_config_kwargs",
]
