"""PhantomCache under generate: cached == uncached, batched == single, beams, cache conversion/refusal."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from phantom_hf import PhantomCache
from phantom_hf.modeling.compat_phantom import cache_of

from .conftest import NEW_TOKENS, image_beam_batch, left_padded_batch, make_model
from .conftest import generate_fixed_length as generate

def test_greedy_cached_equals_uncached_and_rows_equal_single_prompts() -> None:
    model = make_model()
    lengths = [9, 5, 7]
    input_ids, attention_mask = left_padded_batch(lengths, seed=10)
    cached = generate(model, input_ids, attention_mask, do_sample=False)
    uncached = generate(model, input_ids, attention_mask, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # the generated continuations differ between rows: the test is not trivially satisfied
    assert len({tuple(row[-NEW_TOKENS:].tolist()) for row in cached}) > 1
    for row, length in enumerate(lengths):
        alone = input_ids[row : row + 1, -length:]
        single = generate(model, alone, torch.ones_like(alone), do_sample=False)
        assert torch.equal(single[0, -NEW_TOKENS:], cached[row, -NEW_TOKENS:])


def test_beam_search_with_and_without_cache_agree() -> None:
    model = make_model(seed=1)
    input_ids, attention_mask = left_padded_batch([8, 5], seed=11)
    settings = dict(do_sample=False, num_beams=3, num_return_sequences=2)
    cached = generate(model, input_ids, attention_mask, **settings)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **settings)
    assert cached.shape[0] == 4
    assert torch.equal(cached, uncached)


def test_sampling_with_multiple_sequences_keeps_anchors_with_rows() -> None:
    """num_return_sequences repeats the cache rows: anchors must be repeated with them (same seed, same draws)."""
    model = make_model(seed=2)
    input_ids, attention_mask = left_padded_batch([7, 4], seed=12)
    settings = dict(do_sample=True, num_return_sequences=3, top_k=0)
    torch.manual_seed(0)
    cached = generate(model, input_ids, attention_mask, **settings)
    torch.manual_seed(0)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_generate_with_images_in_a_beam_batch() -> None:
    """Rows with different tile counts: tiles are repeated per row as groups for beams."""
    model = make_model(seed=3)
    input_ids, attention_mask, settings = image_beam_batch(model)
    cached = generate(model, input_ids, attention_mask, **settings)
    uncached = generate(model, input_ids, attention_mask, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    alone = generate(model, input_ids[1:, -12:], attention_mask[1:, -12:], **{**settings, "pixel_values": settings["pixel_values"][2:]})
    assert torch.equal(alone[:, -NEW_TOKENS:], cached[2:, -NEW_TOKENS:])


def test_prefill_then_decode_equals_one_forward() -> None:
    model = make_model(seed=4)
    input_ids, attention_mask = left_padded_batch([10, 6], seed=14)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        prefill = model(input_ids=input_ids[:, :7], attention_mask=attention_mask[:, :7], use_cache=True)
        cache = cache_of(prefill)
        assert isinstance(cache, PhantomCache)
        # expanded keys/values: head size 2 * head_dim
        assert cache.layers[0].keys.shape[-1] == 2 * model.config.phantom_head_dim
        decode = model(input_ids=input_ids[:, 7:], attention_mask=attention_mask, cache=cache).logits
    real = attention_mask.bool()
    torch.testing.assert_close(torch.cat([prefill.logits, decode], dim=1)[real], full[real], rtol=1e-10, atol=1e-10)


def test_cache_batch_operations_move_anchors_with_rows() -> None:
    model = make_model(seed=5)
    input_ids, attention_mask = left_padded_batch([6, 4, 5], seed=15)
    with torch.no_grad():
        cache = cache_of(model(input_ids=input_ids, attention_mask=attention_mask))
    keys = cache.layers[0].keys.clone()
    anchor_key, anchor_value = (tensor.clone() for tensor in cache.get_anchors(0))
    assert len(set(anchor_key[:, 0, 0].tolist())) == 3  # rows differ: moves are visible
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.get_anchors(0)[0], anchor_key[[2, 0, 1]])
    assert torch.equal(cache.get_anchors(0)[1], anchor_value[[2, 0, 1]])
    assert torch.equal(cache.layers[0].keys, keys[[2, 0, 1]])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.get_anchors(1)[0][1], cache.get_anchors(1)[0][0])
    assert cache.get_anchors(0)[1].shape[0] == 6
    cache.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(cache.get_anchors(0)[0], anchor_key[[2, 1]])
    cache.crop(-cache.get_seq_length())
    assert not cache.has_anchors()
    with torch.no_grad():
        cache = cache_of(model(input_ids=input_ids, attention_mask=attention_mask))
    cache.reset()
    assert not cache.has_anchors()


def test_plain_dynamic_cache_is_converted_when_empty_and_refused_when_filled() -> None:
    model = make_model(seed=6)
    input_ids, attention_mask = left_padded_batch([6, 6], seed=16)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask, cache=DynamicCache())
        assert isinstance(cache_of(output), PhantomCache)
        filled = DynamicCache()
        filled.update(torch.zeros(2, 2, 6, 16, dtype=torch.float64), torch.zeros(2, 2, 6, 16, dtype=torch.float64), 0)
        with pytest.raises(ValueError, match="DynamicCache holding 6 tokens"):
            model(input_ids=input_ids, attention_mask=attention_mask, cache=filled)

