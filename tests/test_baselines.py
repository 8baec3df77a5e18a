"""Xmodel-VLM / LLaVA-style baselines with the same classes: CLIP and SigLIP towers, XDP and mlp2x_gelu
projectors, and their "+Phantom Dimension" twins (Xmodel-VLM, arXiv 2405.09215; paper Table 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaForCausalLM, SiglipVisionConfig

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.tiny import tiny_text_config

from .conftest import IMAGE_TOKEN_ID, left_padded_batch


def tiny_clip(**overrides) -> CLIPVisionConfig:
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=7)
    return CLIPVisionConfig(**{**values, **overrides})


def test_image_tokens_per_image_for_the_published_shapes() -> None:
    clip_336 = CLIPVisionConfig(image_size=336, patch_size=14)  # 24 x 24 = 576 patches, CLS dropped
    text = tiny_text_config(model_type="llama")
    assert PhantomConfig(vision_config=clip_336, text_config=text, projector_type="xdp").image_seq_length == 144
    assert PhantomConfig(vision_config=clip_336, text_config=text, projector_type="mlp2x_gelu").image_seq_length == 576
    assert PhantomConfig(text_config=text).image_seq_length == 256  # InternViT-448, pixel shuffle 0.5


def test_xdp_projector_equals_direct_computation_on_clip_second_to_last_layer() -> None:
    torch.manual_seed(0)
    config = PhantomConfig(
        vision_config=tiny_clip(),
        text_config=tiny_text_config(model_type="llama"),
        projector_type="xdp",
        vision_feature_layer=-2,
        image_token_id=IMAGE_TOKEN_ID,
        phantom_dimension=False,
    )
    model = PhantomForConditionalGeneration(config).eval()
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        projector = model.multi_modal_projector
        grouped = torch.stack([torch.cat([hidden[:, 4 * i + j] for j in range(4)], dim=-1) for i in range(4)], dim=1)
        expected = projector.linear_2(F.mish(projector.linear_1(grouped)))
        features = model.get_image_features(pixel_values)
    assert features.shape[1] == config.image_seq_length == 4
    torch.testing.assert_close(features, expected)


def test_mlp2x_gelu_projector_on_siglip_full_features() -> None:
    torch.manual_seed(1)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7)
    config = PhantomConfig(
        vision_config=vision,
        text_config=tiny_text_config(),
        projector_type="mlp2x_gelu",
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
        image_token_id=IMAGE_TOKEN_ID,
    )
    model = PhantomForConditionalGeneration(config).eval()
    pixel_values = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        hidden = model.vision_tower(pixel_values=pixel_values).last_hidden_state
        projector = model.multi_modal_projector
        expected = projector.linear_2(F.gelu(projector.linear_1(hidden)))
        torch.testing.assert_close(model.get_image_features(pixel_values), expected)
    assert expected.shape[1] == config.image_seq_length == 16  # SigLIP has no CLS token
    with pytest.raises(ValueError, match="'default' drops a CLS token, but siglip_vision_model has none"):
        PhantomConfig(vision_config=vision, text_config=tiny_text_config(), projector_type="mlp2x_gelu")


def test_phantom_twin_of_a_baseline_matches_it_at_initialisation() -> None:
    torch.manual_seed(2)
    llm = LlamaForCausalLM(tiny_text_config(model_type="llama")).to(torch.float64).eval()
    baseline = PhantomForConditionalGeneration.from_components(
        llm, vision_config=tiny_clip(), projector_type="xdp", image_token_id=IMAGE_TOKEN_ID, phantom_dimension=False
    ).to(torch.float64).eval()
    input_ids, attention_mask = left_padded_batch([12, 9], seed=3)
    input_ids[0, 2:6] = IMAGE_TOKEN_ID
    pixel_values = torch.randn(1, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        reference = baseline(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    twin = PhantomForConditionalGeneration.from_components(
        llm, vision_model=baseline.vision_tower, projector_type="xdp", image_token_id=IMAGE_TOKEN_ID
    ).eval()
    twin.model.multi_modal_projector.load_state_dict(baseline.multi_modal_projector.state_dict())
    with torch.no_grad():
        logits = twin(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    real = attention_mask.bool()
    relative = (logits[real] - reference[real]).abs().max() / reference[real].abs().max()
    assert 0 < relative < 1e-3
