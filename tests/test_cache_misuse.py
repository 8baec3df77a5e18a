"""A cache given to `generate` must fit the prompt: a filled cache handed a new prompt is refused (never silently
continued, never reset behind the user's back), a plain filled cache is refused before any image is read, and a
static cache too small for the prompt and the new tokens says its size and the size needed."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from phantom_hf import PhantomCache, PhantomStaticCache
from phantom_hf.modeling.compat_phantom import cache_kwargs

from .conftest import IMAGE_TOKEN_ID, make_model

SETTINGS = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])


def ids(length: int, seed: int, first: int | None = None) -> torch.Tensor:
    row = torch.randint(10, 128, (1, length), generator=torch.Generator().manual_seed(seed))
    if first is not None:
        row[0, 0] = first
    return row


@pytest.fixture(scope="module")
def model():
    return make_model(seed=4)


@pytest.mark.parametrize("cache_class", ["dynamic", "static"])
@pytest.mark.parametrize("new_length", [6, 12])
def test_a_filled_cache_handed_a_new_prompt_is_refused(model, cache_class: str, new_length: int) -> None:
    """A prompt no longer than the cached conversation cannot continue it (12: as long as turn 1 plus its answer
    minus the last token); after `cache.reset()` the same cache gives what a new cache gives."""
    cache = PhantomCache(config=model.config.text_config) if cache_class == "dynamic" else PhantomStaticCache(model.config.text_config, max_cache_len=32)
    first, second = ids(10, seed=1), ids(new_length, seed=2)
    with torch.no_grad():
        model.generate(input_ids=first, **SETTINGS, **cache_kwargs(cache))
        assert int(cache.get_seq_length()) == 12
        fresh = model.generate(input_ids=second, **SETTINGS)
        with pytest.raises(ValueError, match=f"the cache already holds 12 tokens but the prompt has {new_length}.*cache.reset"):
            model.generate(input_ids=second, **SETTINGS, **cache_kwargs(cache))
        cache.reset()
        assert torch.equal(model.generate(input_ids=second, **SETTINGS, **cache_kwargs(cache)), fresh)


def test_a_longer_prompt_of_another_conversation_is_refused_by_its_anchor(model) -> None:
    cache = PhantomCache(config=model.config.text_config)
    with torch.no_grad():
        turn1 = model.generate(input_ids=ids(10, seed=1, first=20), **SETTINGS, **cache_kwargs(cache))
        other = ids(16, seed=3, first=21)
        with pytest.raises(ValueError, match=r"rows \[0\] of the prompt do not continue the conversation the cache holds: their anchor token is \[21\], the cache's \[20\]"):
            model.generate(input_ids=other, **SETTINGS, **cache_kwargs(cache))
        # the conversation itself, continued, still equals generating it from scratch
        conversation = torch.cat([turn1, ids(4, seed=5)], dim=1)
        assert torch.equal(model.generate(input_ids=conversation, **SETTINGS, **cache_kwargs(cache)), model.generate(input_ids=conversation, **SETTINGS))


def test_an_image_prompt_with_a_filled_plain_cache_names_the_cache(model) -> None:
    text = model.config.text_config
    plain = DynamicCache(config=text)
    for layer in range(text.num_hidden_layers):  # 6 tokens of a conversation, as a plain decoder caches them
        plain.update(*torch.zeros(2, 1, text.num_key_value_heads, 6, model.config.phantom_head_dim, dtype=torch.float64), layer)
    # an image of 2 tiles (8 placeholders) from position 2 on: the cached 6 tokens end inside it
    prompt = torch.cat([ids(2, seed=1), torch.full((1, 8), IMAGE_TOKEN_ID), ids(3, seed=2)], dim=1)
    pixel_values = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with pytest.raises(ValueError, match="the cache is a DynamicCache holding 6 tokens; Phantom attention needs a PhantomCache"):
        model.generate(input_ids=prompt, pixel_values=pixel_values, num_patches=torch.tensor([2]), **SETTINGS, **cache_kwargs(plain))


def test_a_static_cache_too_small_says_its_size_and_the_size_needed(model) -> None:
    prompt = ids(10, seed=1)
    with pytest.raises(ValueError, match=r"the static cache has room for 12 tokens but this generate needs 13 \(10 of prompt \+ 3 new\): create it with max_cache_len >= 13"):
        model.generate(input_ids=prompt, **SETTINGS, **cache_kwargs(PhantomStaticCache(model.config.text_config, max_cache_len=12)))
    with pytest.raises(ValueError, match=r"the static cache has room for 8 tokens but this call needs 10 \(0 cached \+ 10 new\)"):
        model(input_ids=prompt, **cache_kwargs(PhantomStaticCache(model.config.text_config, max_cache_len=8)))
    with torch.no_grad():  # room for exactly the prompt and the new tokens: the answer of a dynamic cache
        exact = model.generate(input_ids=prompt, **SETTINGS, **cache_kwargs(PhantomStaticCache(model.config.text_config, max_cache_len=13)))
        assert torch.equal(exact, model.generate(input_ids=prompt, **SETTINGS))
