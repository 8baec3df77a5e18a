"""PhantomProcessor for LLaVA-style baselines (Xmodel-VLM, arXiv 2405.09215): CLIP and SigLIP towers take one fixed-size image
per `<image>` (no tiling), expanded into `config.image_seq_length` unwrapped placeholders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPVisionConfig, SiglipVisionConfig

from phantom_hf import PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.modeling.processing_phantom import VICUNA_V1_CHAT_TEMPLATE, PhantomProcessor
from phantom_hf.tiny import tiny_text_config
from phantom_hf.tokenization import build_tokenizer

WORDS = ["what", "is", "in", "the", "image", "?", "a", "cat", "dog"]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def baseline_config(tokenizer, vision, **overrides) -> PhantomConfig:
    values = dict(
        vision_config=vision,
        text_config=tiny_text_config("llama", vocab_size=len(tokenizer)),
        projector_type="xdp",
        vision_feature_layer=-2,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        phantom_dimension=False,
    )
    return PhantomConfig(**{**values, **overrides})


def clip(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch_size
    )


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def normalise(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float64) / 255.0
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1)).float()


def test_clip_336_with_xdp_gives_144_unwrapped_placeholders_per_image() -> None:
    tokenizer = build_tokenizer(WORDS)
    config = baseline_config(tokenizer, CLIPVisionConfig(image_size=336, patch_size=14))
    processor = PhantomProcessor.from_config(config, tokenizer)
    assert processor.image_seq_length == config.image_seq_length == 144
    images = [random_image(500, 300, 1), random_image(200, 400, 2)]
    out = processor(images=images, text=["<image>\nwhat is in the image ?", "<image> a cat"], padding=True, return_tensors="pt")
    ids = out["input_ids"]
    assert (ids == config.image_token_id).sum(-1).tolist() == [144, 144]
    for token in ("<img>", "</img>"):  # LLaVA puts only the placeholders where the image goes
        assert not (ids == tokenizer.convert_tokens_to_ids(token)).any()
    assert out["num_patches"].tolist() == [1, 1]
    assert tuple(out["pixel_values"].shape) == (2, 3, 336, 336)
    assert processor._get_num_multimodal_tokens(image_sizes=[[300, 500]]).num_image_tokens == [144]


def test_clip_pixels_equal_pad_resize_normalise() -> None:
    """LLaVA-1.5 / Xmodel-VLM "pad": square with the mean colour, bicubic resize to 28, OpenAI CLIP mean/std."""
    tokenizer = build_tokenizer(WORDS)
    processor = PhantomProcessor.from_config(baseline_config(tokenizer, clip(28, 7)), tokenizer)
    image = random_image(40, 24, 3)
    square = Image.new("RGB", (40, 40), tuple(int(x * 255) for x in CLIP_MEAN))
    square.paste(image, (0, 8))
    expected = normalise(square.resize((28, 28), Image.BICUBIC), CLIP_MEAN, CLIP_STD)
    pixels = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=1e-5)

    # Without padding: shortest edge to 28 (42 x 28), then the centre 28 x 28 crop.
    unpadded = PhantomProcessor.from_config(baseline_config(tokenizer, clip(28, 7)), tokenizer, pad_to_square=False)
    wide = random_image(60, 40, 4)
    expected = normalise(wide.resize((42, 28), Image.BICUBIC).crop((7, 0, 35, 28)), CLIP_MEAN, CLIP_STD)
    pixels = unpadded(images=wide, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=1e-5)


def test_siglip_pixels_equal_resize_normalise_and_full_token_count() -> None:
    tokenizer = build_tokenizer(WORDS)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=7)
    config = baseline_config(tokenizer, vision, projector_type="mlp2x_gelu", vision_feature_select_strategy="full")
    processor = PhantomProcessor.from_config(config, tokenizer)
    image = random_image(50, 30, 5)
    out = processor(images=image, text="<image> what is in the image ?", return_tensors="pt")
    half = np.array([0.5, 0.5, 0.5])
    torch.testing.assert_close(out["pixel_values"][0], normalise(image.resize((28, 28), Image.BICUBIC), half, half), rtol=0, atol=1e-5)
    assert int((out["input_ids"] == config.image_token_id).sum()) == config.image_seq_length == 16  # no CLS in SigLIP


def test_processor_output_feeds_the_baseline_model() -> None:
    """The placeholders line up with the model's vision tokens: the processor's inputs give the same logits as the
    model run on pixels computed directly and a prompt built by hand."""
    tokenizer = build_tokenizer(WORDS)
    config = baseline_config(tokenizer, clip(28, 7))
    torch.manual_seed(0)
    model = PhantomForConditionalGeneration(config).eval()
    processor = PhantomProcessor.from_config(config, tokenizer)
    image = random_image(28, 28, 6)  # square: no padding, no resize
    out = processor(images=image, text="a <image> cat", return_tensors="pt")
    context = config.image_token_id
    by_hand = torch.tensor([[tokenizer.convert_tokens_to_ids("a"), *[context] * 4, tokenizer.convert_tokens_to_ids("cat")]])
    assert torch.equal(out["input_ids"], by_hand)
    with torch.no_grad():
        logits = model(**out).logits
        direct = model(input_ids=by_hand, pixel_values=normalise(image, CLIP_MEAN, CLIP_STD)[None]).logits
    torch.testing.assert_close(logits, direct, rtol=0, atol=1e-5)


def test_bad_settings_for_fixed_size_towers() -> None:
    tokenizer = build_tokenizer(WORDS)
    config = baseline_config(tokenizer, clip(28, 7))
    with pytest.raises(ValueError, match="takes one image, not tiles"):
        PhantomProcessor.from_config(config, tokenizer, max_patches=4)
    minimal = build_tokenizer(WORDS, special_tokens=["<unk>", "<|endoftext|>", "<|im_end|>", "<IMG_CONTEXT>"])
    config_minimal = baseline_config(minimal, clip(28, 7))
    assert PhantomProcessor.from_config(config_minimal, minimal).image_token_ids == [config_minimal.image_token_id]
    no_context = build_tokenizer(WORDS, special_tokens=["<unk>", "<|endoftext|>", "<|im_end|>"])
    with pytest.raises(ValueError, match=r"no single token for \['<IMG_CONTEXT>'\]"):
        PhantomProcessor.from_config(baseline_config(no_context, clip(28, 7), image_token_id=None), no_context)


def test_save_load_round_trip(tmp_path) -> None:
    tokenizer = build_tokenizer(WORDS, padding_side="left")
    config = baseline_config(tokenizer, clip(28, 7))
    processor = PhantomProcessor.from_config(config, tokenizer)
    assert processor.chat_template == VICUNA_V1_CHAT_TEMPLATE  # LLaVA-style projector: the LLaVA-1.5 format
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["wrap_image_tokens"] is False and saved["image_seq_length"] == 4
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "PhantomProcessor" and type(loaded.image_processor).__name__ == "LlavaImageProcessorPil"
    assert (loaded.image_seq_length, loaded.tile_size, loaded.wrap_image_tokens) == (4, 28, False)
    assert loaded.image_processor.do_pad and loaded.chat_template == VICUNA_V1_CHAT_TEMPLATE
    images = [random_image(40, 24, 7), random_image(20, 50, 8)]
    texts = ["<image> a cat <image>", "what is in the image ?"]
    before = processor(images=images, text=texts, padding=True, return_tensors="pt")
    after = loaded(images=images, text=texts, padding=True, return_tensors="pt")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
