"""Bad input to the model and to generate: a ValueError naming the tensor and the bound, never a torch
IndexError or a silently wrong output; continued conversations with new images; config overrides validated
at load time; a failed save leaves the previous model loadable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from transformers import Qwen2ForCausalLM

from phantom_hf import PhantomCache, PhantomConfig, PhantomForConditionalGeneration, PhantomModel
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of
from phantom_hf.tiny import tiny_text_config

from .conftest import IMAGE_TOKEN_ID, make_model

PER_TILE = 4  # vision tokens per 28 px tile of the tiny model


def prompt_ids(images: int, text: int, generator: torch.Generator) -> list[int]:
    """`text` random ids (>= 10) with `images` one-tile images after the first two."""
    ids = torch.randint(10, 128, (text,), generator=generator).tolist()
    return ids[:2] + [IMAGE_TOKEN_ID] * (PER_TILE * images) + ids[2:]


# ------------------------------------------------------------------------------ continued conversations


@pytest.mark.parametrize("mode", ["expanded", "compact"])
@pytest.mark.parametrize("new_images", [1, 2])
@pytest.mark.parametrize("given", ["whole conversation", "new text only"])
def test_continued_conversation_with_new_images_equals_from_scratch(mode: str, new_images: int, given: str) -> None:
    """Turn 2 brings new images into a filled cache: its placeholders get them (not the embedding of
    `<IMG_CONTEXT>`), and the answer equals generating the whole conversation from scratch."""
    model = make_model(seed=3, phantom_cache_mode=mode)
    generator = torch.Generator().manual_seed(new_images)
    pixel_values = torch.randn(1 + new_images, 3, 28, 28, dtype=torch.float64, generator=generator)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    turn1 = torch.tensor([prompt_ids(1, 6, generator)])
    cache = PhantomCache(config=model.config.text_config, mode=mode)
    with torch.no_grad():
        answer1 = model.generate(
            input_ids=turn1, attention_mask=torch.ones_like(turn1), pixel_values=pixel_values[:1], **settings, **cache_kwargs(cache)
        )
        conversation = torch.cat([answer1, torch.tensor([prompt_ids(new_images, 5, generator)])], dim=1)
        mask = torch.ones_like(conversation)
        scratch = model.generate(input_ids=conversation, attention_mask=mask, pixel_values=pixel_values, **settings)
        tiles = pixel_values if given == "whole conversation" else pixel_values[1:]
        continued = model.generate(input_ids=conversation, attention_mask=mask, pixel_values=tiles, **settings, **cache_kwargs(cache))
        # without the new images, turn 2 reads other tokens: the images matter to the answer
        blind = model.generate(
            input_ids=conversation.masked_fill(conversation == IMAGE_TOKEN_ID, 11), attention_mask=mask, **settings
        )
    assert torch.equal(continued, scratch)
    assert not torch.equal(blind[:, -4:], scratch[:, -4:])


def test_continued_conversation_with_num_patches_of_the_whole_chat() -> None:
    """The processor's `num_patches` for the whole chat is narrowed to the new images with their tiles."""
    model = make_model(seed=5)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, 3, 28, 28, dtype=torch.float64, generator=generator)
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    turn1 = torch.tensor([prompt_ids(1, 6, generator)])
    cache = PhantomCache(config=model.config.text_config)
    with torch.no_grad():
        answer1 = model.generate(input_ids=turn1, attention_mask=torch.ones_like(turn1), pixel_values=pixel_values[:1], **settings, **cache_kwargs(cache))
        conversation = torch.cat([answer1, torch.tensor([prompt_ids(2, 4, generator)])], dim=1)  # one image of 2 tiles
        inputs = dict(input_ids=conversation, attention_mask=torch.ones_like(conversation), pixel_values=pixel_values)
        scratch = model.generate(**inputs, num_patches=torch.tensor([1, 2]), **settings)
        continued = model.generate(**inputs, num_patches=torch.tensor([1, 2]), **settings, **cache_kwargs(cache))
    assert torch.equal(continued, scratch)


def test_new_placeholders_without_images_in_a_continued_conversation_are_refused() -> None:
    model = make_model(seed=3)
    generator = torch.Generator().manual_seed(0)
    turn1 = torch.tensor([prompt_ids(0, 6, generator)])
    cache = PhantomCache(config=model.config.text_config)
    with torch.no_grad():
        answer1 = model.generate(input_ids=turn1, max_new_tokens=2, do_sample=False, **cache_kwargs(cache))
        conversation = torch.cat([answer1, torch.tensor([prompt_ids(1, 4, generator)])], dim=1)
        with pytest.raises(ValueError, match=r"4 image placeholder tokens but no pixel_values \(the cache holds"):
            model.generate(input_ids=conversation, max_new_tokens=2, **cache_kwargs(cache))


# ------------------------------------------------------------------------------------------ model inputs


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ids: ids.masked_fill(ids == ids[0, 3], 128), r"input_ids holds token id 128, outside the vocabulary of 128 tokens \(ids 0..127\)"),
        (lambda ids: ids.masked_fill(ids == ids[0, 3], -3), r"input_ids holds token id -3, outside the vocabulary of 128"),
        (lambda ids: ids.float(), "input_ids must hold integer token ids, got a torch.float32 tensor"),
        (lambda ids: ids[:, :0], r"input_ids is empty \(shape \(2, 0\)\)"),
        (lambda ids: ids[0], r"input_ids must have shape \(batch, sequence_length\), got \(9,\)"),
    ],
)
def test_bad_token_ids_name_the_tensor_and_the_bound(model: PhantomForConditionalGeneration, change, message: str) -> None:
    input_ids = torch.randint(10, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=message):
        model(input_ids=change(input_ids))


def test_bad_labels_name_the_tensor_and_the_bound(model: PhantomForConditionalGeneration) -> None:
    input_ids = torch.randint(10, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :3] = -100
    loss = model(input_ids=input_ids, labels=labels).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 8\) but the input has shape \(2, 9\)"):
        model(input_ids=input_ids, labels=labels[:, 1:])
    with pytest.raises(ValueError, match=r"labels holds 500, neither a token id of the vocabulary of 128 tokens \(0..127\)"):
        model(input_ids=input_ids, labels=labels.masked_fill(labels == labels[0, 5], 500))
    with pytest.raises(ValueError, match="labels holds -7"):
        model(input_ids=input_ids, labels=labels.masked_fill(labels == -100, -7))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        model(input_ids=input_ids, labels=labels.float())


def test_empty_prompt_to_generate_is_refused(model: PhantomForConditionalGeneration) -> None:
    with pytest.raises(ValueError, match="input_ids is empty: generate needs a prompt of at least one token"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_pixel_values_of_another_tile_size_or_with_nan_are_refused(model: PhantomForConditionalGeneration) -> None:
    input_ids = torch.randint(10, 128, (1, 9))
    input_ids[0, 2 : 2 + PER_TILE] = IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match=r"tiles of shape \(3, 32, 32\) but this model's vision tower takes \(3, 28, 28\)"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"tiles of shape \(1, 28, 28\)"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 1, 28, 28, dtype=torch.float64))
    pixel_values = torch.randn(1, 3, 28, 28, dtype=torch.float64)
    pixel_values[0, 1, 4, 4] = math.nan
    with pytest.raises(ValueError, match="pixel_values holds NaN or infinite values"):
        model(input_ids=input_ids, pixel_values=pixel_values)


def test_attention_mask_of_another_batch_or_length_is_refused(model: PhantomForConditionalGeneration) -> None:
    input_ids = torch.randint(10, 128, (2, 9))
    with pytest.raises(ValueError, match="attention_mask has batch size 1 but the input has 2 rows"):
        model(input_ids=input_ids, attention_mask=torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask covers 12 tokens, but the cache holds 0 and the input adds 9"):
        model(input_ids=input_ids, attention_mask=torch.ones(2, 12, dtype=torch.long))
    with torch.no_grad():
        output = model(input_ids=input_ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long))
        with pytest.raises(ValueError, match="covers 4 tokens, but the cache holds 5 and the input adds 4: it must cover all 9"):
            model(input_ids=input_ids[:, 5:], attention_mask=torch.ones(2, 4, dtype=torch.long), **cache_kwargs(cache_of(output)))


def test_right_padded_batch_is_refused_by_generate(model: PhantomForConditionalGeneration) -> None:
    input_ids = torch.randint(10, 128, (2, 7))
    mask = torch.ones_like(input_ids)
    mask[1, 5:] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of attention_mask end with padding.*padding_side = 'left'"):
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=2)


# ----------------------------------------------------------------------------------- generation safety


def test_image_placeholders_are_never_generated(tmp_path: Path) -> None:
    """A model whose LM head prefers `<IMG_CONTEXT>` everywhere still never emits it, cached or not, and the
    saved generation config says so for other runtimes."""
    model = make_model(seed=7)
    with torch.no_grad():
        model.lm_head.weight[IMAGE_TOKEN_ID] = model.lm_head.weight.abs().max() * 50 * model.lm_head.weight[IMAGE_TOKEN_ID].sign()
        input_ids = torch.randint(10, 128, (2, 6), generator=torch.Generator().manual_seed(1))
        assert int(model(input_ids=input_ids).logits[:, -1].argmax(-1).eq(IMAGE_TOKEN_ID).sum()) >= 1
        for use_cache in (True, False):
            output = model.generate(input_ids=input_ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache)
            assert not (output[:, 6:] == IMAGE_TOKEN_ID).any()
    model.save_pretrained(tmp_path)
    assert IMAGE_TOKEN_ID in json.loads((tmp_path / "generation_config.json").read_text())["suppress_tokens"]


def test_assisted_generation_with_images_equals_plain_generation() -> None:
    model, assistant = make_model(seed=3), make_model(seed=4)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.tensor([prompt_ids(2, 10, generator)])
    pixel_values = torch.randn(2, 3, 28, 28, dtype=torch.float64, generator=generator)
    settings = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
        max_new_tokens=6, min_new_tokens=6, do_sample=False,
    )  # fmt: skip
    with torch.no_grad():
        plain = model.generate(**settings)
        assisted = model.generate(**settings, assistant_model=assistant)
        lookup = model.generate(**settings, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, plain) and torch.equal(lookup, plain)
    text_only = Qwen2ForCausalLM(tiny_text_config()).double().eval()
    with pytest.raises(ValueError, match="assisted generation with images needs an assistant that reads the same images"):
        model.generate(**settings, assistant_model=text_only)


# ------------------------------------------------------------------------------------- config at load time


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    make_model(seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "override, message",
    [
        ({"phantom_mixing": "foo"}, "phantom_mixing must be one of"),
        ({"phantom_eta": -1}, "phantom_eta must be a number > 0, got -1"),
        ({"phantom_dimension": "no"}, "phantom_dimension must be True or False, got 'no'"),
        ({"image_token_id": 128}, r"image_token_id=128 is outside the vocabulary of text_config.vocab_size=128"),
        ({"phantom_anchor_token_id": -2}, "phantom_anchor_token_id=-2 is outside the vocabulary"),
    ],
)
def test_config_overrides_at_load_time_are_validated_like_the_constructor(saved_folder: Path, override, message) -> None:
    with pytest.raises(ValueError, match=message):
        PhantomConfig(**{**PhantomConfig.from_pretrained(saved_folder).to_dict(), **override})
    with pytest.raises(ValueError, match=message):
        PhantomForConditionalGeneration.from_pretrained(saved_folder, **override)
    with pytest.raises(ValueError, match=message):
        PhantomConfig.from_pretrained(saved_folder, **override)


def test_config_with_fewer_or_more_layers_than_the_weights_is_refused(saved_folder: Path, tmp_path: Path) -> None:
    for layers, message in ((1, "holds 28 weight\\(s\\) this config has no place for"), (3, "lacks 28 weight\\(s\\) of this config")):
        folder = tmp_path / f"layers{layers}"
        folder.mkdir()
        for path in saved_folder.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        config["text_config"]["num_hidden_layers"] = layers
        config["text_config"].pop("layer_types", None)
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            PhantomForConditionalGeneration.from_pretrained(folder)
    # the base model leaves out the LM head of the checkpoint, as transformers' base models do
    base = PhantomModel.from_pretrained(saved_folder)
    assert base.config.text_config.num_hidden_layers == 2 and not hasattr(base, "lm_head")


# ---------------------------------------------------------------------------------------- saving safely


def test_a_save_that_fails_midway_leaves_the_previous_model_loadable(tmp_path: Path, monkeypatch) -> None:
    old = make_model(seed=0)
    old.save_pretrained(tmp_path)
    new = make_model(seed=1, text_config={"num_hidden_layers": 3})

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert not [path for path in tmp_path.parent.iterdir() if path.name.startswith(f".{tmp_path.name}.")]
    reloaded = PhantomForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.text_config.num_hidden_layers == 2
    for name, tensor in old.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name].to(tensor.dtype), tensor), name
    # a sharded save replaces the single file, and a single file the shards and their index
    new.save_pretrained(tmp_path, max_shard_size="100KB")
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    assert PhantomForConditionalGeneration.from_pretrained(tmp_path).config.text_config.num_hidden_layers == 3
    old.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.glob("model*.safetensors*")) == ["model.safetensors"]
