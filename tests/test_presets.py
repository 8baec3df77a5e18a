"""Presets of the four published sizes (paper Sec. 4): dimensions, Phantom-module counts, totals."""

from __future__ import annotations

import pytest
import torch

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.presets import PRESETS, chat_format_for, get_preset_config, list_presets

# paper Sec. 4: layers, hidden, H_q, H_kv, D, chat format, text model type
PAPER_TABLE = {
    "phantom-0.5b": (24, 896, 14, 2, 64, "chatml", "qwen2"),
    "phantom-1.8b": (24, 2048, 16, 8, 128, "chatml", "llama"),
    "phantom-3.8b": (32, 3072, 32, 32, 96, "phi3", "phi3"),
    "phantom-7b": (32, 4096, 32, 8, 128, "chatml", "llama"),
}
# paper Sec. 4 (b): Phantom-module parameters, in millions (low, high)
PAPER_PHANTOM_MILLIONS = {
    "phantom-0.5b": (1.2, 1.2),
    "phantom-1.8b": (4.8, 4.8),
    "phantom-3.8b": (3.5, 3.7),
    "phantom-7b": (6.2, 6.2),
}
NAMED_BILLIONS = {"phantom-0.5b": 0.5, "phantom-1.8b": 1.8, "phantom-3.8b": 3.8, "phantom-7b": 7.0}


def meta_model(config: PhantomConfig) -> PhantomForConditionalGeneration:
    with torch.device("meta"):
        return PhantomForConditionalGeneration(config)


def test_names() -> None:
    assert list_presets() == list(PAPER_TABLE) == list(PRESETS)


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_dimensions_follow_paper_table(name: str) -> None:
    layers, hidden, heads, kv_heads, head_dim, chat_format, model_type = PAPER_TABLE[name]
    config = PhantomConfig.from_preset(name)
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (
        layers, hidden, heads, kv_heads,
    )  # fmt: skip
    assert config.phantom_head_dim == head_dim
    assert text.model_type == model_type
    assert chat_format_for(name) == chat_format == chat_format_for(config)
    # InternViT-300M-448px: hidden 1024, 24 layers, 16 heads, patch 14, image 448, layer scale, LayerNorm, no qk-norm
    assert (vision.model_type, vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        "internvl_vision", 1024, 24, 16,
    )  # fmt: skip
    assert tuple(vision.patch_size) == (14, 14) and tuple(vision.image_size) == (448, 448)
    assert vision.norm_type == "layer_norm" and not vision.use_qk_norm and vision.attention_bias
    assert config.image_seq_length == 256 and config.downsample_ratio == 0.5
    assert 0 <= config.image_token_id < text.vocab_size


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_parameter_counts(name: str) -> None:
    config = PhantomConfig.from_preset(name)
    model = meta_model(config)
    layers, head_dim = config.text_config.num_hidden_layers, config.phantom_head_dim
    params = dict(model.named_parameters())

    phantom = sum(p.numel() for n, p in params.items() if "phantom" in n)
    assert phantom == 3 * 4 * head_dim**2 * layers + 2 * (head_dim + 1) * layers
    low, high = PAPER_PHANTOM_MILLIONS[name]
    assert low * 0.97 <= phantom / 1e6 <= high * 1.03

    vision = sum(p.numel() for n, p in params.items() if n.startswith("model.vision_tower."))
    assert 300e6 <= vision <= 310e6  # InternViT-300M
    hidden, shuffled = config.text_config.hidden_size, 4 * 1024
    projector = sum(p.numel() for n, p in params.items() if n.startswith("model.multi_modal_projector."))
    assert projector == 2 * shuffled + (shuffled + 1) * hidden + (hidden + 1) * hidden

    language = sum(p.numel() for n, p in params.items()) - phantom - vision - projector
    assert 0.95 <= language / 1e9 / NAMED_BILLIONS[name] <= 1.3


def test_overrides_and_errors() -> None:
    config = get_preset_config("phantom-7b", text_config={"num_hidden_layers": 2}, phantom_eta=1.0)
    assert config.text_config.num_hidden_layers == 2
    assert config.text_config.hidden_size == 4096  # the rest of the preset's sub-config is kept
    assert config.phantom_eta == 1.0
    assert PhantomConfig.from_preset("phantom-7b").text_config.num_hidden_layers == 32  # preset data unchanged
    with pytest.raises(ValueError, match="phantom-0.5b, phantom-1.8b, phantom-3.8b, phantom-7b"):
        PhantomConfig.from_preset("phantom-13b")


def test_round_trip(tmp_path) -> None:
    config = PhantomConfig.from_preset("phantom-3.8b")
    config.save_pretrained(tmp_path)
    loaded = PhantomConfig.from_pretrained(tmp_path)
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert loaded.image_token_id == config.image_token_id
