"""PhantomCache modes: "expanded" (cached [k, k*], [v, v*]) and "compact" (plain k, v; expansions recomputed
every step) both give exactly the uncached model's results; compact holds half the key/value bytes."""

from __future__ import annotations

import pytest
import torch

from phantom_hf import PhantomCache
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of

from .conftest import NEW_TOKENS, generate_fixed_length, left_padded_batch, make_model

LENGTHS = [9, 5, 7]


def greedy(model, input_ids, attention_mask, **kwargs):
    return generate_fixed_length(model, input_ids, attention_mask, do_sample=False, return_dict_in_generate=True, **kwargs)


def key_value_bytes(cache: PhantomCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_both_modes_generate_the_uncached_tokens_and_compact_is_half_the_size() -> None:
    model = make_model(seed=7)
    input_ids, attention_mask = left_padded_batch(LENGTHS, seed=20)
    uncached = greedy(model, input_ids, attention_mask, use_cache=False).sequences
    expanded = greedy(model, input_ids, attention_mask)
    compact_cache = PhantomCache(config=model.config.text_config, mode="compact")
    compact = greedy(model, input_ids, attention_mask, **cache_kwargs(compact_cache))
    assert len({tuple(row[-NEW_TOKENS:].tolist()) for row in uncached}) > 1  # rows differ: not a trivial pass
    assert torch.equal(expanded.sequences, uncached)
    assert torch.equal(compact.sequences, uncached)

    assert isinstance(cache_of(expanded), PhantomCache) and cache_of(expanded).mode == "expanded"
    assert isinstance(cache_of(compact), PhantomCache) and cache_of(compact).mode == "compact"
    head_dim = model.config.phantom_head_dim
    assert cache_of(expanded).layers[0].keys.shape[-1] == 2 * head_dim
    assert cache_of(compact).layers[0].keys.shape[-1] == head_dim
    assert cache_of(compact).get_seq_length() == cache_of(expanded).get_seq_length()
    assert 2 * key_value_bytes(cache_of(compact)) == key_value_bytes(cache_of(expanded))


def test_config_field_selects_compact_and_logits_match_uncached_at_every_step() -> None:
    model = make_model(seed=8, phantom_cache_mode="compact")
    input_ids, attention_mask = left_padded_batch([10, 6], seed=21)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        prefill = model(input_ids=input_ids[:, :6], attention_mask=attention_mask[:, :6], use_cache=True)
        cache = cache_of(prefill)
        assert cache.mode == "compact"
        steps = [prefill.logits]
        for position in range(6, input_ids.shape[1]):
            out = model(
                input_ids=input_ids[:, position : position + 1],
                attention_mask=attention_mask[:, : position + 1],
                cache=cache,
            )
            steps.append(out.logits)
    real = attention_mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-10, atol=1e-10)


def test_beam_search_in_compact_mode_matches_uncached() -> None:
    """Beams reorder and repeat the cache rows: compact mode must move its anchors with them too."""
    model = make_model(seed=9)
    input_ids, attention_mask = left_padded_batch([8, 5], seed=22)
    settings = dict(num_beams=3, num_return_sequences=2)
    compact_cache = PhantomCache(config=model.config.text_config, mode="compact")
    compact = greedy(model, input_ids, attention_mask, **cache_kwargs(compact_cache), **settings).sequences
    uncached = greedy(model, input_ids, attention_mask, use_cache=False, **settings).sequences
    assert torch.equal(compact, uncached)


def test_forward_kwarg_selects_the_mode_and_unknown_mode_is_a_clear_error() -> None:
    model = make_model()
    input_ids, attention_mask = left_padded_batch([4], seed=23)
    with torch.no_grad():
        cache = cache_of(model(input_ids=input_ids, attention_mask=attention_mask, phantom_cache_mode="compact"))
    assert cache.mode == "compact" and cache.layers[0].keys.shape[-1] == model.config.phantom_head_dim
    with pytest.raises(ValueError, match="mode must be 'expanded' or 'compact', got 'tiny'"):
        model(input_ids=input_ids, attention_mask=attention_mask, phantom_cache_mode="tiny")


def test_generate_call_selects_the_cache_mode() -> None:
    model = make_model(seed=9)
    input_ids, attention_mask = left_padded_batch(LENGTHS, seed=23)
    uncached = greedy(model, input_ids, attention_mask, use_cache=False).sequences
    compact = greedy(model, input_ids, attention_mask, phantom_cache_mode="compact")
    assert cache_of(compact).mode == "compact"
    assert cache_of(compact).layers[0].keys.shape[-1] == model.config.phantom_head_dim
    assert torch.equal(compact.sequences, uncached)
