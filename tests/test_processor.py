"""PhantomProcessor: dynamic tiling (paper Sec. 4), `<image>` expansion, chat templates, bad input, save/load."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Phi3Config
from transformers.processing_utils import ProcessorMixin

from phantom_hf.modeling import PhantomConfig, PhantomForConditionalGeneration
from phantom_hf.modeling.processing_phantom import (
    CHATML_CHAT_TEMPLATE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHI3_CHAT_TEMPLATE,
    PhantomProcessor,
    add_image_tokens,
    build_image_processor,
    chat_format_for,
    chat_template_for,
)
from phantom_hf.tiny import tiny_phantom_config, tiny_vision_config
from phantom_hf.tokenization import build_tokenizer

WORDS = [f"w{i}" for i in range(40)] + ["what", "is", "in", "the", "image", "?", "a", "cat", "dog", "be", "brief", "."]
TINY_TILE = 28  # tiny_vision_config: 28x28 tiles, 4 vision tokens per tile


def make_tokenizer(**kwargs) -> "PreTrainedTokenizerFast":  # noqa: F821
    return build_tokenizer(WORDS, **kwargs)


def tiny_config(tokenizer, **overrides):
    """A tiny Phantom config whose vocabulary is the test tokenizer's and whose image token is its <IMG_CONTEXT>."""
    text = {"vocab_size": len(tokenizer), **overrides.pop("text_config", {})}
    return tiny_phantom_config(
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), text_config=text, **overrides
    )


def tiny_processor(tokenizer=None, **kwargs) -> PhantomProcessor:
    tokenizer = tokenizer or make_tokenizer()
    return PhantomProcessor.from_config(tiny_config(tokenizer), tokenizer, **kwargs)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(array, mode=mode)


def published_grid(width: int, height: int, tile: int = 448, max_tiles: int = 6) -> tuple[int, int]:
    """(columns, rows) of the published tiling: the grid with 1 <= cols*rows <= max_tiles whose aspect ratio is
    closest to the image's; on a tie the published code moves to the larger grid while the image covers more
    than half of its area."""
    grids = sorted(
        ((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
        key=lambda grid: grid[0] * grid[1],
    )
    best, best_diff = (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def published_tiles(width: int, height: int, tile: int = 448) -> int:
    """Tiles of one image: the grid, plus the thumbnail when the grid has more than one tile."""
    cols, rows = published_grid(width, height, tile)
    return cols * rows + (1 if cols * rows > 1 else 0)


def normalize(image: Image.Image) -> np.ndarray:
    """ImageNet normalisation to (3, H, W), as InternVL prescribes."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return array.transpose(2, 0, 1)


def context_runs(ids: list[int], processor: PhantomProcessor) -> list[int]:
    """Lengths of the <IMG_CONTEXT> runs of one row, each checked to sit between <img> and </img>."""
    runs, position = [], 0
    while position < len(ids):
        if ids[position] == processor.image_start_token_id:
            end = ids.index(processor.image_end_token_id, position)
            body = ids[position + 1 : end]
            assert body and set(body) == {processor.image_token_id}
            runs.append(len(body))
            position = end
        position += 1
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Tiling
# ----------------------------------------------------------------------------------------------------------------

SIZES = [(800, 600), (600, 800), (1000, 200), (200, 1000), (1600, 400), (900, 600), (500, 1000), (2000, 300),
         (448, 448), (1000, 1000), (300, 250)]


@pytest.fixture(scope="module")
def published_processor() -> PhantomProcessor:
    """448 px tiles, 256 tokens per tile: the published models' setting."""
    return PhantomProcessor(build_image_processor(), make_tokenizer(), image_seq_length=256)


@pytest.mark.parametrize("width,height", SIZES)
def test_tiling_follows_published_grid(published_processor, width, height):
    tiles = published_tiles(width, height)
    out = published_processor(images=random_image(width, height), text="<image>what is in the image?")
    assert out["num_patches"] == [tiles]
    assert len(out["pixel_values"]) == tiles and out["pixel_values"][0].shape == (3, 448, 448)
    assert context_runs(out["input_ids"][0], published_processor) == [256 * tiles]


def test_800x600_is_3x2_grid_plus_thumbnail(published_processor):
    assert published_grid(800, 600) == (3, 2)
    out = published_processor(images=random_image(800, 600), text="<image>what is in the image?", return_tensors="pt")
    assert out["num_patches"].tolist() == [7]
    assert out["pixel_values"].shape == (7, 3, 448, 448)
    assert int((out["input_ids"] == published_processor.image_token_id).sum()) == 1792


def test_tile_pixels_are_row_major_crops_then_thumbnail():
    """Tiles are bicubic crops of the image resized to the grid, row by row, then the whole-image thumbnail,
    normalised with ImageNet mean/std."""
    processor = tiny_processor()
    image = random_image(80, 60, seed=3)
    cols, rows = published_grid(80, 60, tile=TINY_TILE)
    assert (cols, rows) == (3, 2)
    out = processor(images=image, text="<image>", return_tensors="pt")
    resized = image.resize((cols * TINY_TILE, rows * TINY_TILE), Image.BICUBIC)
    expected = [
        resized.crop((c * TINY_TILE, r * TINY_TILE, (c + 1) * TINY_TILE, (r + 1) * TINY_TILE))
        for r in range(rows)
        for c in range(cols)
    ]
    expected.append(image.resize((TINY_TILE, TINY_TILE), Image.BICUBIC))
    expected = torch.from_numpy(np.stack([normalize(tile) for tile in expected]))
    torch.testing.assert_close(out["pixel_values"], expected, atol=1e-5, rtol=0)


def test_tile_limits_are_configurable():
    wide = random_image(120, 40)  # aspect ratio 3
    assert published_grid(120, 40, TINY_TILE, max_tiles=6) == (3, 1) and published_grid(120, 40, TINY_TILE, max_tiles=2) == (2, 1)
    assert tiny_processor()(images=wide, text="<image>")["num_patches"] == [3 + 1]
    processor = tiny_processor(max_patches=2)
    assert processor(images=wide, text="<image>")["num_patches"] == [2 + 1]
    assert processor(images=wide, text="<image>", max_patches=1)["num_patches"] == [1]  # tiling off: one tile
    # a square image that must take at least 3 tiles gets the only square grid with 3 to 6 tiles, 2x2
    assert tiny_processor(min_patches=3)(images=random_image(28, 28), text="<image>")["num_patches"] == [2 * 2 + 1]


# ----------------------------------------------------------------------------------------------------------------
# Text expansion and batching
# ----------------------------------------------------------------------------------------------------------------


def test_placeholders_match_tiles_in_a_mixed_batch():
    processor = tiny_processor()
    sizes = [(80, 60), (30, 90), (28, 28)]
    images = [random_image(width, height, seed) for seed, (width, height) in enumerate(sizes)]
    texts = ["<image> a cat <image> what is in the image ?", "be brief .", "<image> what is the dog ?"]
    out = processor(images=images, text=texts, padding=True, return_tensors="pt")
    tiles = out["num_patches"].tolist()
    assert tiles == [published_tiles(width, height, TINY_TILE) for width, height in sizes] == [7, 4, 1]
    assert out["pixel_values"].shape[0] == sum(tiles)
    per_row = [context_runs(row.tolist(), processor) for row in out["input_ids"]]
    assert per_row == [[4 * 7, 4 * 4], [], [4 * 1]]
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 4 * out["pixel_values"].shape[0]
    # one list of images per prompt gives the same tensors
    nested = processor(images=[images[:2], [], images[2:]], text=texts, padding=True, return_tensors="pt")
    for key in out:
        torch.testing.assert_close(nested[key], out[key], rtol=0, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_is_the_tokenizers(side):
    processor = tiny_processor(make_tokenizer(padding_side=side))
    out = processor(images=[random_image(28, 28)], text=["<image> a cat", "be brief"], padding=True, return_tensors="pt")
    short = out["attention_mask"][1]
    assert short.sum() == 2 and short.shape[0] == 1 + 4 + 1 + 2  # <img> + 4 placeholders + </img> + "a cat"
    pad_positions = (short == 0).nonzero().flatten().tolist()
    assert pad_positions == ([0, 1, 2, 3, 4, 5] if side == "left" else [2, 3, 4, 5, 6, 7])


def test_grayscale_rgba_and_array_layouts_are_converted():
    processor = tiny_processor()

    def pixels(image):
        return processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]

    gray = random_image(56, 28, mode="L")
    as_rgb = Image.merge("RGB", [gray, gray, gray])
    torch.testing.assert_close(pixels(gray), pixels(as_rgb), rtol=0, atol=0)
    torch.testing.assert_close(pixels(np.asarray(gray)), pixels(as_rgb), rtol=0, atol=0)  # (H, W) array
    # a fully transparent RGBA image is composited onto white
    transparent = np.zeros((28, 56, 4), dtype=np.uint8)
    white = Image.new("RGB", (56, 28), (255, 255, 255))
    torch.testing.assert_close(pixels(Image.fromarray(transparent, mode="RGBA")), pixels(white), rtol=0, atol=0)
    torch.testing.assert_close(pixels(transparent), pixels(white), rtol=0, atol=0)
    # (H, W, C) arrays, (C, H, W) tensors and PIL images agree
    rgb = random_image(56, 28, seed=5)
    hwc = np.array(rgb)
    torch.testing.assert_close(pixels(hwc), pixels(rgb), rtol=0, atol=0)
    torch.testing.assert_close(pixels(torch.from_numpy(hwc).permute(2, 0, 1)), pixels(rgb), rtol=0, atol=0)


def test_images_from_paths_and_bytes(tmp_path):
    processor = tiny_processor()
    image = random_image(56, 28, seed=7)
    image.save(tmp_path / "image.png")
    reference = processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    for source in (str(tmp_path / "image.png"), tmp_path / "image.png", (tmp_path / "image.png").read_bytes()):
        torch.testing.assert_close(processor(images=source, text="<image>", return_tensors="pt")["pixel_values"], reference)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_image_count_must_match_markers():
    processor = tiny_processor()
    image = random_image(28, 28)
    with pytest.raises(ValueError, match=r"2 <image> marker\(s\) .* but 1 image\(s\) were given"):
        processor(images=[image], text="<image> a <image> cat")
    with pytest.raises(ValueError, match=r"1 <image> marker\(s\) .* but 2 image\(s\) were given"):
        processor(images=[image, image], text="<image> a cat")
    with pytest.raises(ValueError, match="no images were given"):
        processor(text="<image> a cat")
    with pytest.raises(ValueError, match=r"prompt 1 has 1 <image> marker\(s\) but 0 image\(s\) were given for it"):
        processor(images=[[image], []], text=["<image> a", "<image> b"])


def test_undecodable_and_zero_size_images(tmp_path):
    processor = tiny_processor()
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    (tmp_path / "truncated.png").write_bytes(truncated)
    (tmp_path / "text.png").write_bytes(b"this is not an image")
    for source in (str(tmp_path / "truncated.png"), str(tmp_path / "text.png"), b"\x00\x01 not an image"):
        with pytest.raises(ValueError, match="image 0 .*cannot be decoded"):
            processor(images=source, text="<image>")
    lazily_opened = Image.open(io.BytesIO(truncated))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        processor(images=lazily_opened, text="<image>")
    with pytest.raises(ValueError, match="not a readable image file"):
        processor(images=str(tmp_path / "missing.png"), text="<image>")
    with pytest.raises(ValueError, match=r"image 1 .*zero size \(0x5 pixels\)"):
        processor(images=[random_image(28, 28), Image.new("RGB", (0, 5))], text="<image><image>")
    with pytest.raises(ValueError, match=r"zero size \(shape \(0, 5, 3\)\)"):
        processor(images=np.zeros((0, 5, 3), dtype=np.uint8), text="<image>")
    with pytest.raises(TypeError, match="unsupported type int"):
        processor(images=[3], text="<image>")


def test_prompt_too_long_after_expansion_says_by_how_much():
    tokenizer = make_tokenizer()
    processor = tiny_processor(tokenizer)
    text = "<image> what is in the image ?"
    length = len(processor(images=random_image(80, 60), text=text)["input_ids"][0])
    assert length == 1 + 4 * 7 + 1 + 6
    tokenizer.model_max_length = 30
    with pytest.raises(ValueError, match=rf"prompt 0 is {length} tokens long .* {length - 30} more than the maximum length 30"):
        processor(images=random_image(80, 60), text=text)
    # truncation may shorten a text-only prompt, never one with image placeholders
    with pytest.raises(ValueError, match=rf"{length - 20} more than the maximum length 20"):
        processor(images=random_image(80, 60), text=text, truncation=True, max_length=20)
    long_text = " ".join(["w1"] * 40)
    out = processor(text=[long_text], truncation=True, max_length=20)
    assert len(out["input_ids"][0]) == 20
    with pytest.raises(ValueError, match="10 more than the maximum length 30"):
        processor(text=long_text)


def test_tokenizer_without_image_tokens_and_add_image_tokens():
    plain = build_tokenizer(WORDS, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    with pytest.raises(ValueError, match=r"no single token for \['<img>', '</img>', '<IMG_CONTEXT>'\].*add_image_tokens"):
        PhantomProcessor(build_image_processor(), plain)
    config = tiny_phantom_config(image_token_id=None, text_config={"vocab_size": len(plain)})
    model = PhantomForConditionalGeneration(config).eval()
    vocab_before = len(plain)
    assert add_image_tokens(plain, model) == ["<img>", "</img>", "<IMG_CONTEXT>"]
    assert model.get_input_embeddings().num_embeddings == vocab_before + 3
    assert model.get_output_embeddings().weight.shape[0] == vocab_before + 3
    assert model.config.image_token_id == plain.convert_tokens_to_ids("<IMG_CONTEXT>") == vocab_before + 2
    assert add_image_tokens(plain, model) == []  # idempotent
    processor = PhantomProcessor.from_config(model.config, plain)
    inputs = processor(images=random_image(28, 28), text="<image> a cat", return_tensors="pt")
    assert model(**inputs).logits.shape == (1, 1 + 4 + 1 + 2, vocab_before + 3)


def test_image_token_id_must_match_config():
    tokenizer = make_tokenizer()
    config = tiny_phantom_config(image_token_id=5, text_config={"vocab_size": len(tokenizer)})
    with pytest.raises(ValueError, match="<IMG_CONTEXT> id is 10 but config.image_token_id is 5"):
        PhantomProcessor.from_config(config, tokenizer)


def test_model_reports_image_seq_length_mismatch():
    tokenizer = make_tokenizer()
    config = tiny_config(tokenizer)
    model = PhantomForConditionalGeneration(config).eval()
    wrong = PhantomProcessor(build_image_processor(TINY_TILE), tokenizer, image_seq_length=3)
    inputs = wrong(images=random_image(80, 60), text="<image> a cat", return_tensors="pt")
    with pytest.raises(ValueError, match=r"7 tiles into 3 image placeholders.*config.image_seq_length = 4"):
        model(**inputs)
    inputs["num_patches"] = torch.tensor([6])
    with pytest.raises(ValueError, match="num_patches adds up to 6 tiles but pixel_values holds 7"):
        model(**inputs)


# ----------------------------------------------------------------------------------------------------------------
# Chat templates and decoding
# ----------------------------------------------------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": [{"type": "text", "text": "be brief ."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": "what is the dog ?"},
]


def test_chatml_and_phi3_templates():
    processor = tiny_processor()
    assert processor.chat_template == CHATML_CHAT_TEMPLATE
    assert processor.apply_chat_template(CHAT, add_generation_prompt=True) == (
        "<|im_start|>system\nbe brief .<|im_end|>"
        "<|im_start|>user\n<image>\nwhat is in the image ?<|im_end|>"
        "<|im_start|>assistant\na cat .<|im_end|>"
        "<|im_start|>user\nwhat is the dog ?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(CHAT[1:2]) == "<|im_start|>user\n<image>\nwhat is in the image ?<|im_end|>"
    assert processor.apply_chat_template(CHAT, chat_template=PHI3_CHAT_TEMPLATE, add_generation_prompt=True) == (
        "<|system|>\nbe brief .<|end|>"
        "<|user|>\n<image>\nwhat is in the image ?<|end|>"
        "<|assistant|>\na cat .<|end|>"
        "<|user|>\nwhat is the dog ?<|end|>"
        "<|assistant|>\n"
    )


def test_chat_template_is_selected_per_checkpoint():
    tokenizer = make_tokenizer()
    phi3_text = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    phi3 = PhantomConfig(text_config=phi3_text, vision_config=tiny_vision_config(), image_token_id=10)
    assert chat_template_for(phi3) == PHI3_CHAT_TEMPLATE
    assert PhantomProcessor.from_config(phi3, tokenizer).chat_template == PHI3_CHAT_TEMPLATE
    assert chat_template_for(tiny_config(tokenizer)) == CHATML_CHAT_TEMPLATE
    for model_type in ("qwen2", "qwen3", "llama", "chatml"):
        assert chat_template_for(model_type) == CHATML_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="no Phantom chat format for 'gpt2'"):
        chat_template_for("gpt2")


def test_one_resolver_decides_the_chat_format():
    tokenizer = make_tokenizer()
    assert [chat_format_for(name) for name in ("phantom-0.5b", "phantom-1.8b", "phantom-3.8b", "phantom-7b")] == [
        "chatml", "chatml", "phi3", "chatml",
    ]  # fmt: skip
    assert chat_format_for("xmodel-vlm-1.1b") == "vicuna_v1" == chat_format_for(tiny_config(tokenizer, projector_type="mlp2x_gelu"))
    assert chat_format_for("phi3") == "phi3" and chat_format_for("qwen3") == "chatml" == chat_format_for(tiny_config(tokenizer))
    with pytest.raises(ValueError, match="no published-Phantom variant"):
        chat_template_for("vicuna_v1", published=True)


# The published prompt rule (github ByungKwanLee/Phantom, utils/utils.py `make_instruction` for its demo and each
# model's `prompt_rule`): user_start + "<image>" + question + user_end + assistant_start, split "".
PUBLISHED_RULES = {"chatml": ("<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n"), "phi3": ("<|user|>\n", "<|end|>", "<|assistant|>\n")}


@pytest.mark.parametrize("chat_format", ["chatml", "phi3"])
def test_published_template_glues_the_image_to_the_question(chat_format):
    user_start, user_end, assistant_start = PUBLISHED_RULES[chat_format]
    processor = tiny_processor(chat_template=chat_template_for(chat_format, published=True))
    question = "Describe the image in detail"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    published = user_start + "<image>" + question + user_end + assistant_start
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == published
    assert processor.user_prompt(question, images=1) == published
    # the template this package trains with puts a newline after the marker; that is the only difference
    ours = tiny_processor(chat_template=chat_template_for(chat_format))
    assert ours.user_prompt(question, images=1) == published.replace("<image>", "<image>\n")
    assert ours.user_prompt("<image>\nw1") == ours.apply_chat_template([{"role": "user", "content": "<image>\nw1"}], add_generation_prompt=True)
    # a processor built without a chat template speaks ChatML, the Phantom family's format
    bare = PhantomProcessor(tiny_processor().image_processor, make_tokenizer(), image_seq_length=4)
    assert bare.user_prompt("w1", images=2) == "<|im_start|>user\n<image>\n<image>\nw1<|im_end|><|im_start|>assistant\n"


def test_add_special_tokens_default_is_the_processors():
    tokenizer = build_tokenizer(WORDS, special_tokens=["<unk>", "<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"], bos_token="<s>")
    from tokenizers import processors

    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    text = "<|im_start|>user\nw1 w2<|im_end|>"
    assert tiny_processor(tokenizer)(text=text)["input_ids"][0][0] == bos  # the tokenizer's default adds <s>
    published = tiny_processor(tokenizer, published_format=True)
    assert published.add_special_tokens is False
    ids = published(text=text)["input_ids"][0]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert published(text=text, add_special_tokens=True)["input_ids"][0][0] == bos  # a call's own setting wins
    chat = [{"role": "user", "content": "w1 w2"}]
    out = published.apply_chat_template(chat, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert out["input_ids"][0][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ValueError, match="add_special_tokens must be True, False or None"):
        PhantomProcessor(published.image_processor, tokenizer, image_seq_length=4, add_special_tokens="no")


def published_side_by_side(images: list[Image.Image], margin: int = 10) -> Image.Image:
    """The published layout (test.py + utils/utils.py `concat_images_horizontally_with_margin`), restated with PIL:
    black canvas as high as the highest image, images left to right `margin` apart, each centred vertically."""
    height = max(image.height for image in images)
    canvas = Image.new("RGB", (sum(image.width for image in images) + margin * (len(images) - 1), height), (0, 0, 0))
    left = 0
    for image in images:
        canvas.paste(image, (left, (height - image.height) // 2))
        left += image.width + margin
    return canvas


def test_side_by_side_layout_pastes_a_prompts_images_into_one():
    images = [random_image(40, 30, 1), random_image(25, 57, 2), random_image(31, 20, 3)]
    tiles = tiny_processor()
    side = tiny_processor(multi_image_layout="side_by_side")
    reference = tiles(images=published_side_by_side(images), text="<image>w1", return_tensors="pt")
    for text, given in (("<image>w1", [images]), ("<image>w1", images), ("<image><image><image>w1", images)):
        out = side(images=given, text=text, return_tensors="pt")
        torch.testing.assert_close(out["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
        assert out["input_ids"].tolist() == reference["input_ids"].tolist()
        assert out["num_patches"].tolist() == reference["num_patches"].tolist() == [published_tiles(122, 57, TINY_TILE)]
    # per prompt in a batch; a prompt with one image is unchanged; tiling each image stays available
    batch = side(images=[[images[0], images[1]], [images[2]]], text=["<image>w1", "<image>w2"], padding=True, return_tensors="pt")
    single = tiles(images=[published_side_by_side(images[:2]), images[2]], text=["<image>w1", "<image>w2"], padding=True, return_tensors="pt")
    for key in batch:
        torch.testing.assert_close(batch[key], single[key], rtol=0, atol=0)
    assert tiles(images=images, text="<image><image><image>w1")["num_patches"] == [published_tiles(*image.size, TINY_TILE) for image in images]
    with pytest.raises(ValueError, match="prompt 0 has 2 <image> marker\\(s\\) but 3 image\\(s\\)"):
        side(images=[images], text="<image><image>w1")
    with pytest.raises(ValueError, match="multi_image_layout must be one of"):
        tiny_processor(multi_image_layout="grid")


def test_apply_chat_template_tokenizes_with_images_and_assistant_mask():
    processor = tiny_processor()
    image = random_image(80, 60)
    chat = [dict(message) for message in CHAT[:3]]
    chat[1] = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is in the image ?"}]}
    options = dict(tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True)
    if not hasattr(ProcessorMixin, "_adjust_assistant_masks_indices"):  # transformers < 5.23 misplaces the mask
        with pytest.raises(ValueError, match="needs transformers >= 5.23"):
            processor.apply_chat_template(chat, **options)
        return
    out = processor.apply_chat_template(chat, **options)
    direct = processor(images=image, text=processor.apply_chat_template(chat), return_tensors="pt")
    for key in direct:
        torch.testing.assert_close(out[key], direct[key], rtol=0, atol=0)
    answer = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert processor.decode(answer) == "a cat . <|im_end|>"  # the answer and its end token, nothing else


def test_batch_decode_strips_prompt_and_special_tokens():
    processor = tiny_processor()
    inputs = processor(images=random_image(80, 60), text=processor.apply_chat_template(CHAT[1:2], add_generation_prompt=True))
    answer = processor.tokenizer.encode("a cat . <|im_end|>", add_special_tokens=False)
    generated = [inputs["input_ids"][0] + answer]
    assert processor.batch_decode(generated, prompt_ids=inputs["input_ids"]) == ["a cat ."]
    assert processor.batch_decode(generated) == ["user what is in the image ? assistant a cat ."]


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    processor = tiny_processor(make_tokenizer(padding_side="left"), chat_template=PHI3_CHAT_TEMPLATE, max_patches=4)
    processor.add_special_tokens, processor.multi_image_layout = False, "side_by_side"
    processor.save_pretrained(tmp_path)
    files = {path.name for path in Path(tmp_path).iterdir()}
    assert {"processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "processing_phantom.py"} <= files
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_phantom.PhantomProcessor"
    }
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "PhantomProcessor"
    assert (loaded.image_seq_length, loaded.tile_size, loaded.image_processor.max_patches) == (4, TINY_TILE, 4)
    assert loaded.chat_template == PHI3_CHAT_TEMPLATE and loaded.tokenizer.padding_side == "left"
    assert (loaded.add_special_tokens, loaded.multi_image_layout) == (False, "side_by_side")
    images = [random_image(80, 60, 1), random_image(30, 90, 2)]
    texts = ["<image> a cat <image>", "be brief ."]
    before = processor(images=images, text=texts, padding=True, return_tensors="pt")
    after = loaded(images=images, text=texts, padding=True, return_tensors="pt")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
