"""BufferedDynamicLayer, the growing-buffer cache layer of PhantomCache: same contents as transformers'
`DynamicLayer` (torch.cat) after every update and batch operation, in-place writes between growths,
bounded spare room, and the same generated tokens as the uncached model and the torch.cat cache."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from phantom_hf import PhantomCache
from phantom_hf.modeling.cache_phantom import BufferedDynamicLayer
from phantom_hf.modeling.compat_phantom import cache_kwargs, cache_of

from .conftest import generate_fixed_length, left_padded_batch, make_model


def states(batch: int, tokens: int, seed: int, heads: int = 2, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, dim, generator=generator), torch.randn(batch, heads, tokens, dim, generator=generator)


def assert_same(layer: BufferedDynamicLayer, reference: DynamicLayer) -> None:
    assert layer.get_seq_length() == reference.get_seq_length()
    assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
    assert layer.get_mask_sizes(1) == reference.get_mask_sizes(1)


def test_updates_write_in_place_grow_geometrically_and_match_torch_cat() -> None:
    layer, reference = BufferedDynamicLayer(growth=1.5, min_spare=0), DynamicLayer()
    keys, values = states(3, 5, seed=0)
    returned = layer.update(keys, values)
    reference.update(keys, values)
    assert returned[0] is layer.keys and returned[1] is layer.values
    assert_same(layer, reference)
    assert layer.capacity == 8  # ceil(5 * 1.5)
    growths, storage = 0, layer.keys.untyped_storage().data_ptr()
    for step in range(40):
        keys, values = states(3, 1 + step % 3, seed=step + 1)
        layer.update(keys, values)
        reference.update(keys, values)
        assert_same(layer, reference)
        pointer = layer.keys.untyped_storage().data_ptr()
        growths += pointer != storage
        storage = pointer
        # the spare room stays bounded: buffers hold at most ~1.5x (here: < 2x) the filled tokens
        assert layer._key_buffer.numel() <= 2 * layer.keys.numel()
        assert layer._value_buffer.numel() <= 2 * layer.values.numel()
    assert layer.get_seq_length() == 5 + sum(1 + step % 3 for step in range(40))
    assert 4 <= growths <= 8  # geometric: a handful of reallocations for 80 tokens, writes in place otherwise


def test_batch_operations_crop_reset_and_deepcopy_match_a_dynamic_layer() -> None:
    layer, reference = BufferedDynamicLayer(min_spare=3), DynamicLayer()
    keys, values = states(4, 6, seed=1)
    layer.update(keys, values)
    reference.update(keys, values)
    operations = [
        lambda c: c.crop(-2),
        lambda c: c.reorder_cache(torch.tensor([2, 2, 0, 1])),
        lambda c: c.batch_repeat_interleave(2),
        lambda c: c.batch_select_indices(torch.tensor([0, 3, 4, 7])),
        lambda c: c.batch_select_indices(slice(1, 3)),
        lambda c: c.crop(-1),
    ]
    for index, operation in enumerate(operations):
        operation(layer)
        operation(reference)
        assert_same(layer, reference)
        keys, values = states(layer.keys.shape[0], 2, seed=10 + index)
        layer.update(keys, values)
        reference.update(keys, values)
        assert_same(layer, reference)

    duplicate = copy.deepcopy(layer)
    keys, values = states(2, 1, seed=30)
    duplicate.update(keys, values)
    assert_same(layer, reference)  # the copy's writes do not reach the original's buffers
    reference.update(keys, values)
    assert_same(duplicate, reference)

    layer.crop(-layer.get_seq_length())
    assert layer.get_seq_length() == 0 and layer.keys.shape[-2] == 0
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys is None and not layer.is_initialized
    keys, values = states(1, 3, seed=40)
    assert torch.equal(layer.update(keys, values)[0], keys)


def test_assigned_tensors_are_adopted_and_never_written_in_place() -> None:
    """Code that assigns keys/values (the base class's offloading, user code) keeps working, and the
    layer does not write into a tensor it did not allocate."""
    layer = BufferedDynamicLayer()
    keys, values = states(1, 4, seed=2)
    layer.update(keys, values)
    foreign_keys, foreign_values = keys[..., :3, :].clone(), values[..., :3, :].clone()
    untouched = foreign_keys.clone()
    layer.keys, layer.values = foreign_keys, foreign_values
    assert layer.get_seq_length() == 3
    new_keys, new_values = states(1, 1, seed=3)
    layer.update(new_keys, new_values)
    assert torch.equal(layer.keys, torch.cat([foreign_keys, new_keys], dim=-2))
    layer.keys, layer.values = foreign_keys, foreign_values
    layer.crop(-1)
    layer.update(new_keys, new_values)
    assert torch.equal(foreign_keys, untouched)


def test_autograd_and_inference_mode_are_respected() -> None:
    layer = BufferedDynamicLayer()
    with torch.inference_mode():
        layer.update(*states(1, 3, seed=4))
    keys, values = states(1, 1, seed=5)
    with torch.no_grad():  # the buffers are inference tensors: they are reallocated, not written
        out_keys, _ = layer.update(keys, values)
    assert not out_keys.is_inference() and torch.equal(out_keys[..., -1:, :], keys)

    layer = BufferedDynamicLayer()
    weight = torch.ones((), requires_grad=True)
    (keys_0, values_0), (keys_1, values_1) = states(1, 3, seed=6), states(1, 1, seed=7)
    first, _ = layer.update(keys_0 * weight, values_0 * weight)
    second, _ = layer.update(keys_1 * weight, values_1 * weight)  # concatenates: nothing saved is overwritten
    (first.sum() + second.sum()).backward()
    torch.testing.assert_close(weight.grad, 2 * keys_0.sum() + keys_1.sum())


def test_bad_growth_settings_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="growth >= 1 and min_spare >= 0"):
        BufferedDynamicLayer(growth=0.5)
    with pytest.raises(ValueError, match="growth >= 1 and min_spare >= 0, got growth=1.25, min_spare=-1"):
        PhantomCache(min_spare=-1)


def test_phantom_cache_buffers_full_attention_layers_and_keeps_sliding_ones() -> None:
    config = Qwen2Config(
        num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=4, use_sliding_window=True,
    )
    cache = PhantomCache(config=config)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer, BufferedDynamicLayer, BufferedDynamicLayer]
    lazy = PhantomCache(growth=2.0, min_spare=0)
    lazy.update(*states(1, 3, seed=8), 1)
    assert [type(layer) for layer in lazy.layers] == [BufferedDynamicLayer, BufferedDynamicLayer]
    assert lazy.layers[1].capacity == 6 and lazy.get_seq_length(1) == 3


def stock_cache(model, mode: str) -> PhantomCache:
    """The previous behaviour: a PhantomCache whose layers are transformers' DynamicLayer (torch.cat)."""
    cache = PhantomCache(config=model.config.text_config, mode=mode)
    cache.layers = [DynamicLayer() for _ in cache.layers]
    return cache


@pytest.fixture
def flush_denormals():
    """The tiny float64 models with large Phantom weights produce subnormal numbers, which make the uncached
    runs ~10x slower on x86; flushing them keeps these tests fast (all compared runs share the setting)."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.usefixtures("flush_denormals")
@pytest.mark.parametrize("mode", ["expanded", "compact"])
@pytest.mark.parametrize(
    "strategy",
    [dict(do_sample=False), dict(do_sample=False, num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=0)],
    ids=["greedy", "beam", "sample"],
)
def test_generate_with_the_buffer_cache_matches_uncached_and_torch_cat(mode: str, strategy: dict, monkeypatch) -> None:
    """A long generation from a tiny capacity: the buffers grow several times and the tokens stay exact."""
    model = make_model(seed=11)
    input_ids, attention_mask = left_padded_batch([9, 4, 6], seed=24)
    new_tokens = 24
    growths = []
    original = BufferedDynamicLayer._grown
    monkeypatch.setattr(BufferedDynamicLayer, "_grown", lambda self, *a: growths.append(1) or original(self, *a))

    def run(**run_kwargs):
        torch.manual_seed(3)
        return generate_fixed_length(
            model, input_ids, attention_mask, new_tokens, return_dict_in_generate=True, **strategy, **run_kwargs
        )

    buffered = run(**cache_kwargs(PhantomCache(config=model.config.text_config, mode=mode, growth=1.2, min_spare=0)))
    per_layer_growths = len(growths) / model.config.text_config.num_hidden_layers
    uncached = run(use_cache=False).sequences
    concatenated = run(**cache_kwargs(stock_cache(model, mode))).sequences
    assert len({tuple(row[-new_tokens:].tolist()) for row in uncached}) > 1  # rows differ: not a trivial pass
    assert torch.equal(buffered.sequences, uncached)
    assert torch.equal(buffered.sequences, concatenated)
    assert per_layer_growths >= 4

    cache = cache_of(buffered)
    assert all(type(layer) is BufferedDynamicLayer for layer in cache.layers)
    head_dim = model.config.phantom_head_dim
    assert cache.layers[0].keys.shape[-1] == (2 * head_dim if mode == "expanded" else head_dim)
    assert cache.get_seq_length() == input_ids.shape[1] + new_tokens - 1
    for layer in cache.layers:  # the spare room stays below the filled part
        assert layer._key_buffer.numel() <= 2 * layer.keys.numel()
